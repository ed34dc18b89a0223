"""scripts/loadtest.py, run as users run it (a process of its own: locust patches the
standard library for gevent) for a few seconds against the session's app.

The 10-minute soak is a documented command (docs/RELIABILITY.md), not part of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, deploy_config, tiny_config
from tests.test_serving import with_deployment

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

SCRIPT = ROOT / "scripts" / "loadtest.py"


def run_loadtest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(tmp_path / "load.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def report_of(tmp_path, *args: str) -> dict:
    finished = run_loadtest(tmp_path, *args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads((tmp_path / "load.json").read_text())


def test_a_steady_rate_below_capacity_gets_only_200s_with_latency_and_memory_figures(strata, tmp_path):
    report = report_of(tmp_path, "--url", strata, "--server-pid", str(os.getpid()), "--mode", "steady",
                       "--rate", "3", "--duration", "6", "--warmup", "2", "--sample-every", "2",
                       "--model", "tiny", "--width", "320", "--height", "240")
    assert report["requests"] >= 6
    assert report["status_counts"] == {"200": report["requests"]}
    assert report["error_rate"] == 0 and report["warmup"]["errors_by_status"] == {}
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]  # locust rounds them: no max check
    memory = report["memory"]
    # The session's Ray (GCS, raylet, Serve controller, proxy, replicas) runs under this pytest process.
    assert memory["after_warmup"]["processes"] >= 5 and memory["after_warmup"]["rss_mb"] > 100
    assert memory["end"]["rss_mb"] > 100 and isinstance(memory["growth_pct"], float)
    assert len(memory["samples"]) >= 3


def overload(tmp_path, strata: str) -> dict:
    """The load test's report of 12 callers back to back for 5 s on the tiny model."""
    return report_of(tmp_path, "--url", strata, "--mode", "overload", "--users", "12", "--duration", "5",
                     "--warmup", "0", "--model", "tiny", "--width", "320", "--height", "240")


def assert_every_503_carries_retry_after(report: dict) -> None:
    statuses = report["status_counts"]
    assert set(statuses) == {"200", "503"}, statuses
    assert report["retry_after"]["503"] == statuses["503"] > 0
    assert report["retry_after"]["all_503s_had_it"] is True


def test_past_capacity_every_503_carries_retry_after_and_is_a_problem(strata, tmp_path, tiny_models_dir, data_dir):
    # One request at a time and one waiting: anything more is turned away.
    deploy_config(with_deployment(tiny_config(tiny_models_dir, data_dir), "tiny", max_ongoing_requests=1,
                                  max_queued_requests=1,
                                  user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.5}))
    report = overload(tmp_path, strata)
    assert_every_503_carries_retry_after(report)
    assert report["errors_not_problem_json"] == {}


def test_past_the_ingress_queue_the_503s_serve_answers_itself_carry_retry_after_too(strata, tmp_path, tiny_models_dir, data_dir):
    # Two requests in the ingress and one queued for it: Serve turns the rest away itself
    # (under the fast path, the ingress replica's own HTTP server; else the proxy actor).
    config = with_deployment(tiny_config(tiny_models_dir, data_dir), "Ingress", max_ongoing_requests=2,
                             max_queued_requests=1)
    deploy_config(with_deployment(config, "tiny", user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.5}))
    assert_every_503_carries_retry_after(overload(tmp_path, strata))


def test_a_target_off_this_machine_is_refused_before_any_request(tmp_path):
    finished = run_loadtest(tmp_path, "--url", "http://203.0.113.10:8000", "--duration", "1")
    assert finished.returncode == 2
    assert "refused" in finished.stderr and "non-loopback 203.0.113.10" in finished.stderr
    assert not (tmp_path / "load.json").exists()
