"""serve_app/haproxy_binds.py refuses a config it cannot confine, rather than serve with
ports open (its rewrite of Ray's real config is tested through `make run`'s command in
tests/test_run_command.py)."""

from __future__ import annotations

import pytest

from serve_app.haproxy_binds import confine

RAY_LINES = """global
    stats socket /tmp/haproxy-serve/x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
listen stats
  bind *:8404
"""


def test_the_stats_page_metrics_and_admin_socket_are_confined():
    confined = confine(RAY_LINES, "127.0.0.1")
    assert "bind 127.0.0.1:9101" in confined and "bind 127.0.0.1:8404" in confined
    assert "admin.sock mode 600 level admin" in confined
    assert "bind :" not in confined and "bind *:" not in confined


@pytest.mark.parametrize("missing", ["  bind *:8404\n", "    bind :9101\n", " mode 666"])
def test_a_config_without_a_line_it_confines_is_refused(missing):
    with pytest.raises(ValueError, match="as Ray 2.60 writes it"):
        confine(RAY_LINES.replace(missing, "\n" if missing.endswith("\n") else ""), "127.0.0.1")
