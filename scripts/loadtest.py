#!/usr/bin/env python
"""Load and soak tests of Strata's background removal, with locust run as a library.

    python scripts/loadtest.py --mode steady --rate 1 --duration 600 --json soak.json
    python scripts/loadtest.py --mode overload --users 64 --duration 30 --url http://127.0.0.1:8000

By default it serves `--config` (configs/local.yaml) itself, as `make run` does, on
a free loopback port with a Ray of its own (RAY_ADDRESS=local) and a throwaway data
directory, and stops it at the end; `--url` targets a running Strata instead. Only
loopback targets are accepted: this tool floods what it points at.

Modes:
- ``steady``: about ``--rate`` requests per second for ``--duration`` seconds
  (``--users`` callers, each pacing itself to rate/users: locust's
  ``constant_throughput``). Below capacity, every answer should be a 200.
- ``overload``: ``--users`` callers posting back to back for ``--duration`` seconds.
  Past the queue bounds the answers are 503s, each with ``Retry-After``.

A run is bounded by ``--duration`` and by ``--max-requests``, whichever comes first;
each request by ``--timeout`` (a request that hits it counts as an error).

The report (printed, and written with ``--json``): requests, answers by status, error
rate, latency p50/p95/p99 (after warm-up), whether every 503 carried ``Retry-After``,
and the server's resident memory: the summed RSS of every process under the server's
root process (the Ray and Serve processes), sampled when the ``--warmup`` ends, every
``--sample-every`` seconds, and at the end, with the growth from warm-up to the end.
With ``--url``, pass ``--server-pid`` (the process the Ray processes descend from,
e.g. the one that ran `serve run` or `ray.init`) to measure memory.
"""

from __future__ import annotations

# locust patches the standard library for gevent when imported: before anything else.
# isort: off
import locust
from locust import HttpUser, constant, constant_throughput, task
from locust.env import Environment
# isort: on

import argparse
import contextlib
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import gevent
import numpy as np
import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.run import free_port, spare_serve_ports  # noqa: E402

ROUTE = "/v1/remove-background"


# --------------------------------------------------------------------------- target


class NotLoopback(ValueError):
    """The target is not this machine's loopback interface."""


def check_loopback(url: str) -> str:
    """`url` without a trailing slash, if its host resolves only to loopback addresses."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise NotLoopback(f"{url!r} is not an http(s) URL")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise NotLoopback(f"{parsed.hostname!r} does not resolve: {exc}") from exc
    addresses = {info[4][0] for info in infos}
    foreign = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if foreign:
        raise NotLoopback(f"{parsed.hostname!r} resolves to non-loopback {', '.join(foreign)}; "
                          "this tool only loads this machine's loopback interface")
    return url.rstrip("/")


@contextlib.contextmanager
def served_strata(config_path: Path, log_path: Path, start_timeout_s: float) -> Iterator[tuple[str, int]]:
    """`python -m serve_app.run CONFIG` on a free loopback port with a throwaway data
    directory; yields (base URL, root pid) once /v1/health answers, stops it after."""
    config = yaml.safe_load(config_path.read_text())
    port = free_port()
    config.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    with tempfile.TemporaryDirectory(prefix="strata-loadtest-") as workdir:
        for application in config["applications"]:
            application.setdefault("args", {}).setdefault("jobs", {})["data_dir"] = str(Path(workdir) / "data")
        served_config = Path(workdir) / config_path.name
        served_config.write_text(yaml.safe_dump(config))
        # A Ray of its own, not whatever cluster this machine runs; the repository
        # first on the path, so this checkout's code is what serves.
        env = {**os.environ, "RAY_ADDRESS": "local", **spare_serve_ports(),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "serve_app.run", str(served_config)], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_until_serving(base, server, start_timeout_s, log_path)
            yield base, server.pid
        finally:
            _stop(server)


def _wait_until_serving(base: str, server: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before serving; see {log_path}")
        with contextlib.suppress(requests.RequestException):
            response = requests.get(f"{base}/v1/health", timeout=30)
            if response.status_code == 200 and response.json()["status"] == "ok":
                return
        time.sleep(1)
    raise RuntimeError(f"{base} did not become healthy within {timeout_s:g} s; see {log_path}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM (serve_app.run turns it into Serve's clean shutdown); the group is killed if that hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --------------------------------------------------------------------------- memory


def server_rss(root_pid: int) -> tuple[int, int]:
    """(summed RSS in bytes, process count) of every process under `root_pid`, this one excluded."""
    try:
        processes = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total, count = 0, 0
    for process in processes:
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
            count += 1
    return total, count


# --------------------------------------------------------------------------- load


def product_photo_jpeg(width: int, height: int) -> bytes:
    """A product-shot-like JPEG: a shaded object on a gradient studio backdrop, with noise."""
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(225 - 30 * y, (height, width, 3)).copy()
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width * 9 // 20, height // 2), (width // 6, height // 3), 0, 0, 360, 255, -1, cv2.LINE_AA)
    shade = np.linspace(0.6, 1.1, width, dtype=np.float32)[None, :, None]
    subject = np.array([166, 112, 38], np.float32) * shade
    alpha = (mask.astype(np.float32) / 255)[..., None]
    image = image * (1 - alpha) + subject * alpha + rng.normal(0, 3, image.shape)
    ok, data = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


class Tally:
    """Answers by status, for the warm-up and for the measured part of the run."""

    def __init__(self):
        self.phase = "warmup"
        self.statuses: dict[str, Counter] = {"warmup": Counter(), "measured": Counter()}
        self.busy = {"503": 0, "with_retry_after": 0}
        self.not_problem_json: Counter = Counter()
        self.total = 0

    def record(self, response: Any, exception: BaseException | None) -> None:
        status = getattr(response, "status_code", 0) or 0
        if not status:  # no HTTP answer: name the transport error (timeout, refused, reset)
            exception = getattr(response, "error", None) or exception
        key = str(status) if status else f"error:{type(exception).__name__ if exception else 'no answer'}"
        self.statuses[self.phase][key] += 1
        self.total += 1
        if status == 503:
            self.busy["503"] += 1
            self.busy["with_retry_after"] += "retry-after" in response.headers
        if status >= 400 and response.headers.get("content-type") != "application/problem+json":
            self.not_problem_json[key] += 1


def make_user(image: bytes, params: dict[str, str], timeout_s: float, pacing) -> type[HttpUser]:
    class RemoveBackground(HttpUser):
        """One caller posting the photo to /v1/remove-background."""

        wait_time = pacing

        @task
        def remove_background(self) -> None:
            # No redirects: an answer must not send the load to another host.
            with self.client.post(ROUTE, params=params, files={"image": ("photo.jpg", image, "image/jpeg")},
                                  timeout=timeout_s, name=ROUTE, allow_redirects=False,
                                  catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}")

    return RemoveBackground


def run_load(args: argparse.Namespace, base: str, root_pid: int | None) -> dict[str, Any]:
    image = product_photo_jpeg(args.width, args.height)
    params = {"model": args.model} if args.model else {}
    if args.mode == "steady":
        users = args.users or max(2, math.ceil(args.rate * 4))
        pacing = constant_throughput(args.rate / users)
    else:
        users = args.users or 64
        pacing = constant(0)
    user_class = make_user(image, params, args.timeout, pacing)
    env = Environment(user_classes=[user_class], host=base, catch_exceptions=True)
    runner = env.create_local_runner()
    tally = Tally()
    stopped_by = ["duration"]

    def on_request(response=None, exception=None, **_):
        tally.record(response, exception)
        if tally.total >= args.max_requests and stopped_by == ["duration"]:
            stopped_by[0] = "max_requests"
            gevent.spawn(runner.quit)  # not from this user's own greenlet, which quit would kill

    env.events.request.add_listener(on_request)
    memory: dict[str, Any] = {"root_pid": root_pid, "samples": []}
    started = time.monotonic()

    def sample(label: str | None = None) -> None:
        if root_pid is None:
            return
        rss, count = server_rss(root_pid)
        entry = {"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss / 2**20, 1), "processes": count}
        memory["samples"].append(entry)
        if label:
            memory[label] = entry

    def end_warmup() -> None:
        tally.phase = "measured"
        env.stats.reset_all()  # latency figures cover the measured part only
        sample("after_warmup")

    def sample_periodically() -> None:
        while True:
            gevent.sleep(args.sample_every)
            sample()

    runner.start(users, spawn_rate=users)
    timers = [gevent.spawn_later(args.warmup, end_warmup),
              gevent.spawn_later(args.warmup + args.duration, runner.quit),
              gevent.spawn(sample_periodically)]
    runner.greenlet.join()
    elapsed = time.monotonic() - started
    gevent.killall(timers)
    if tally.phase == "warmup":  # stopped by max_requests during warm-up
        end_warmup()
    sample("end")

    total = env.stats.total
    measured = tally.statuses["measured"]
    requests_measured = sum(measured.values())
    errors = {status: n for status, n in measured.items() if status != "200"}
    warmup_errors = {status: n for status, n in tally.statuses["warmup"].items() if status != "200"}
    measured_s = max(elapsed - args.warmup, 0.0)
    if memory.get("after_warmup") and memory.get("end") and memory["after_warmup"]["rss_mb"]:
        memory["growth_pct"] = round(100 * (memory["end"]["rss_mb"] / memory["after_warmup"]["rss_mb"] - 1), 2)
    elif root_pid is None:
        memory["not_measured"] = "no server process to measure: pass --server-pid with --url"
    return {
        "mode": args.mode,
        "target": base,
        "route": ROUTE,
        "params": params,
        "image": {"width": args.width, "height": args.height, "bytes": len(image), "format": "jpeg"},
        "users": users,
        "rate_target_per_s": args.rate if args.mode == "steady" else None,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 1),
        "stopped_by": stopped_by[0],
        "requests": requests_measured,
        "measured_s": round(measured_s, 1),
        "rate_achieved_per_s": round(requests_measured / measured_s, 3) if measured_s else None,
        "status_counts": dict(measured),
        "errors_by_status": errors,
        "error_rate": round(sum(errors.values()) / requests_measured, 6) if requests_measured else None,
        "warmup": {"requests": sum(tally.statuses["warmup"].values()), "errors_by_status": warmup_errors},
        "latency_ms": {
            "p50": total.get_response_time_percentile(0.50),
            "p95": total.get_response_time_percentile(0.95),
            "p99": total.get_response_time_percentile(0.99),
            "mean": round(total.avg_response_time, 1),
            "max": round(total.max_response_time, 1),
        },
        "retry_after": {**tally.busy, "all_503s_had_it": tally.busy["with_retry_after"] == tally.busy["503"]},
        "errors_not_problem_json": dict(tally.not_problem_json),
        "memory": memory,
    }


# --------------------------------------------------------------------------- main


def print_report(report: dict[str, Any]) -> None:
    latency, memory = report["latency_ms"], report["memory"]
    print(f"{report['mode']}: {report['requests']} requests in {report['measured_s']:.0f} s "
          f"after {report['warmup_s']:g} s warm-up ({report['rate_achieved_per_s']}/s, {report['users']} users)")
    print(f"  status: {report['status_counts']}  error rate: {report['error_rate']}")
    print(f"  latency ms: p50 {latency['p50']}  p95 {latency['p95']}  p99 {latency['p99']}  max {latency['max']}")
    print(f"  503s: {report['retry_after']['503']}, with Retry-After: {report['retry_after']['with_retry_after']}")
    if "growth_pct" in memory:
        print(f"  server RSS: {memory['after_warmup']['rss_mb']} MB after warm-up -> {memory['end']['rss_mb']} MB "
              f"at the end ({memory['growth_pct']:+.2f} %, {memory['end']['processes']} processes)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("steady", "overload"), default="steady")
    parser.add_argument("--rate", type=float, default=1.0, help="steady: requests per second (default 1)")
    parser.add_argument("--users", type=int, help="concurrent callers (steady: rate x 4, at least 2; overload: 64)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load after the warm-up (default 60)")
    parser.add_argument("--warmup", type=float, default=10, help="seconds of load before measuring (default 10)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many (default 100000)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds one request may take (default 150)")
    parser.add_argument("--model", help="?model= of each request (default: the server's default model)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--url", help="a running Strata on loopback (default: serve --config here)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml",
                        help="the Serve config to serve when no --url is given (default configs/local.yaml)")
    parser.add_argument("--server-pid", type=int, help="with --url: the process the server's Ray processes descend from")
    parser.add_argument("--server-log", type=Path, help="the served config's log (default: a temporary file)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server to serve")
    parser.add_argument("--sample-every", type=float, default=15, help="seconds between memory samples (default 15)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    args = parser.parse_args(argv)
    for name in ("rate", "duration", "timeout", "sample_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.max_requests < 1 or (args.users is not None and args.users < 1):
        parser.error("--warmup must be >= 0, --max-requests and --users >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        try:
            base = check_loopback(args.url)
        except NotLoopback as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        report = run_load(args, base, args.server_pid)
        report["server"] = {"started_here": False}
    else:
        log_path = args.server_log or Path(tempfile.mkstemp(prefix="strata-loadtest-", suffix=".log")[1])
        with served_strata(args.config, log_path, args.start_timeout) as (base, root_pid):
            report = run_load(args, base, root_pid)
        report["server"] = {"started_here": True, "config": str(args.config), "log": str(log_path)}
    report["locust_version"] = locust.__version__
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
