"""serve_app/haproxy_overrides.py: what it changes in Ray's HAProxy config, and that it
refuses a config it does not recognise rather than serve with ports open. (Its run on
Ray's real config is tested through `make run`'s command in tests/test_run_command.py.)"""

from __future__ import annotations

import pytest

from serve_app.haproxy_overrides import override, unavailable_response

RAY_LINES = """global
    stats socket /tmp/haproxy-serve/x/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
    errorfile 502 /tmp/haproxy-serve/x/500.http
    errorfile 503 /tmp/haproxy-serve/x/500.http
    errorfile 504 /tmp/haproxy-serve/x/500.http
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
    log global
    acl backend_http-strata_server_up nbsrv(http-strata) ge 1
listen stats
  bind *:8404
"""


def _override(config: str) -> str:
    return override(config, host="127.0.0.1", unavailable_file="/x/strata-503.http", http_request_timeout_s=30,
                    retry_after_s=2)


def test_the_stats_page_metrics_and_admin_socket_are_confined():
    changed = _override(RAY_LINES)
    assert "bind 127.0.0.1:9101" in changed and "bind 127.0.0.1:8404" in changed
    assert "admin.sock mode 600 level admin" in changed
    assert "bind :" not in changed and "bind *:" not in changed


def test_haproxys_own_errors_answer_503_and_requests_get_a_header_deadline():
    changed = _override(RAY_LINES)
    assert "500.http" not in changed and changed.count("/x/strata-503.http") == 3
    assert "defaults\n    timeout http-request 30s\n" in changed


def test_the_frontend_sets_the_client_address_and_turns_serves_bare_500_into_a_503_problem():
    changed = _override(RAY_LINES)
    frontend = changed[changed.index("frontend http_frontend"):changed.index("listen stats")]
    (rule,) = [line for line in frontend.splitlines() if "http-response" in line]
    assert "    http-request set-header X-Forwarded-For %[src]\n" in frontend
    assert rule.strip().startswith("http-response return status 503 content-type application/problem+json")
    assert "hdr Retry-After 2 " in rule
    assert rule.endswith("if { status 500 } { res.hdr(content-type) -m beg text/plain }")


def test_the_503_is_problem_json_with_retry_after_and_a_true_length():
    head, body = unavailable_response(3).split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 503 ")
    assert "Retry-After: 3" in head and "Content-Type: application/problem+json" in head
    assert f"Content-Length: {len(body)}" in head and '"status": 503' in body


def test_haproxy_answers_the_liveness_path_itself_while_the_ingress_is_up():
    changed = _override(RAY_LINES)
    (rule,) = [line for line in changed.splitlines() if "{ path /healthz }" in line]
    assert rule.strip().startswith("http-request return status 200 content-type application/json")
    assert 'string "{\\"status\\":\\"ok\\"}"' in rule
    assert rule.endswith("if { path /healthz } backend_http-strata_server_up")
    assert changed.index("acl backend_http-strata_server_up") < changed.index(rule)


def test_before_any_application_there_is_no_liveness_rule():
    changed = _override(RAY_LINES.replace("    acl backend_http-strata_server_up nbsrv(http-strata) ge 1\n", ""))
    assert "{ path /healthz }" not in changed


@pytest.mark.parametrize("missing", ["  bind *:8404\n", "    bind :9101\n", " mode 666",
                                     "    errorfile 504 /tmp/haproxy-serve/x/500.http\n",
                                     "    bind 127.0.0.1:8000\n"])
def test_a_config_without_a_line_it_changes_is_refused(missing):
    with pytest.raises(ValueError, match="as Ray 2.60 writes it"):
        _override(RAY_LINES.replace(missing, "\n" if missing.endswith("\n") else ""))
