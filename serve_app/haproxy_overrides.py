#!/usr/bin/env python3
"""Ray Serve's HAProxy, started with what Strata changes in Ray's config for it.

Ray 2.60 writes HAProxy's config from a template nothing configures, and under
``make run`` three of its choices are wrong for Strata:

- it binds the stats page (``listen stats``: ``bind *:8404``) and the Prometheus
  metrics (``bind :9101``) on every interface, whatever ``http_options.host`` says,
  and opens the admin socket to every local user (``mode 666 level admin``);
- it answers its own 502/503/504 (no ingress replica, a replica gone mid-request) with
  a bare ``500`` and no ``Retry-After``, and passes on Serve's proxy's bare
  ``text/plain`` 500 for a request whose replica died: clients take an outage for a
  server bug. (Strata's own 500s are ``application/problem+json``: left alone.);
- it sets no ``timeout http-request``, so connections that trickle a request's headers
  a byte at a time hold HAProxy's connections for as long as they like;
- it sends Strata's liveness check (``/healthz``) through to the ingress like any
  request, so under load it waits its turn (26 s at 200 concurrent, issue 28 reports): HAProxy
  now answers it itself while an ingress replica passes its health checks;
- it passes no client address: every request reaches the ingress from HAProxy's, so
  per-address rate limits would count all clients as one. The frontend now sets
  ``X-Forwarded-For`` to the client's address (replacing any the client sent), which
  the ingress trusts from its ``auth.trusted_proxies`` only.

``make run`` points ``RAY_SERVE_HAPROXY_BINARY_PATH`` here (serve_app/run.py). Ray starts
this with the arguments it gives HAProxy; it writes a copy of the ``-f`` config beside
Ray's with the binds on ``STRATA_HAPROXY_HOST``, the socket for its owner only, those
errors answered ``503`` with ``Retry-After: STRATA_RETRY_AFTER_S`` (HAProxy's own with a
problem+json body like the API's), and ``timeout http-request
STRATA_HTTP_REQUEST_TIMEOUT_S``;
then it becomes the real HAProxy (``STRATA_HAPROXY_BINARY``) on that copy.

If Ray's config does not hold the lines this rewrites (another Ray), it refuses to
start HAProxy rather than serve with those ports open; Ray then reports that HAProxy
did not start, with this message in its log.

Only the standard library: Ray runs it as an executable, with any ``python3``.
"""

from __future__ import annotations

import json
import os
import re
import sys

# The lines of Ray's template that this rewrites.
STATS_BIND = re.compile(r"^(\s*)bind \*:(\d+)\s*$", re.MULTILINE)
METRICS_BIND = re.compile(r"^(\s*)bind :(\d+)\s*$", re.MULTILINE)
ADMIN_SOCKET_MODE = re.compile(r"^(\s*stats socket \S+) mode 666 ", re.MULTILINE)
ERROR_FILES = re.compile(r"^(\s*)errorfile (50[234]) \S+\s*$", re.MULTILINE)
DEFAULTS = re.compile(r"^defaults\s*$", re.MULTILINE)
BACKEND_UP_ACL = re.compile(r"^(\s*)acl (backend_\S+_server_up) nbsrv\(\S+\) ge 1\s*$", re.MULTILINE)
HTTP_FRONTEND_BIND = re.compile(r"^(frontend http_frontend\n(\s*)bind \S+\n)", re.MULTILINE)
UNAVAILABLE_FILE = "strata-503.http"
STRATA_CONFIG = "haproxy.strata.cfg"  # the changed copy, beside Ray's haproxy.cfg


def _problem(detail: str) -> dict:
    return {"type": "urn:strata:problem:service-unavailable", "title": "Service Unavailable",
            "status": 503, "detail": detail}


def unavailable_response(retry_after_s: int) -> str:
    """The raw HTTP response HAProxy sends when no ingress replica can answer."""
    body = json.dumps(_problem("Strata cannot answer this request right now (its ingress is restarting or "
                               "overloaded); retry after the Retry-After seconds."))
    return ("HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/problem+json\r\n"
            f"Retry-After: {retry_after_s}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n" + body)


def _one(pattern: re.Pattern, replacement, text: str, what: str, count: int = 1) -> str:
    rewritten, found = pattern.subn(replacement, text)
    if found != count:
        raise ValueError(f"{what} is not in Ray's HAProxy config as Ray 2.60 writes it ({found} found)")
    return rewritten


def _frontend_rules(indent: str, retry_after_s: int) -> str:
    body = json.dumps(_problem("An ingress replica stopped while it handled this request; "
                               "retry after the Retry-After seconds.")).replace('"', '\\"')
    return (f"{indent}# The client's address, for per-address rate limits; never one the client sent.\n"
            f"{indent}http-request set-header X-Forwarded-For %[src]\n"
            f"{indent}# Serve's proxy answers a request whose replica died with a bare text/plain 500.\n"
            f"{indent}http-response return status 503 content-type application/problem+json "
            f"hdr Retry-After {retry_after_s} string \"{body}\" "
            f"if {{ status 500 }} {{ res.hdr(content-type) -m beg text/plain }}\n")


def _liveness_rule(config: str, path: str) -> str:
    """``config`` with HAProxy answering ``path`` itself (Strata's /healthz body) while a
    backend has a server up, placed after the last of Ray's "server up" ACLs. (Ray's
    first config, before any application is deployed, has no backends: nothing to add.)"""
    found = list(BACKEND_UP_ACL.finditer(config))
    if not found:
        return config
    indent, last = found[-1].group(1), found[-1].end()
    condition = " || ".join(f"{{ path {path} }} {match.group(2)}" for match in found)
    rule = (f"\n{indent}# Liveness in HAProxy: /healthz never waits behind a loaded ingress.\n"
            f"{indent}http-request return status 200 content-type application/json "
            f"hdr Cache-Control no-store string \"{{\\\"status\\\":\\\"ok\\\"}}\" if {condition}")
    return config[:last] + rule + config[last:]


def override(config: str, *, host: str, unavailable_file: str, http_request_timeout_s: int,
             retry_after_s: int, healthz_path: str = "/healthz") -> str:
    """Ray's HAProxy ``config`` with Strata's changes (the module docstring lists them);
    ValueError if a line they change is missing."""
    config = _one(STATS_BIND, lambda m: f"{m.group(1)}bind {host}:{m.group(2)}", config, "the stats page's bind")
    config = _one(METRICS_BIND, lambda m: f"{m.group(1)}bind {host}:{m.group(2)}", config, "the metrics' bind")
    config = _one(ADMIN_SOCKET_MODE, r"\1 mode 600 ", config, "the admin socket")
    config = _one(ERROR_FILES, lambda m: f"{m.group(1)}errorfile {m.group(2)} {unavailable_file}", config,
                  "the 502/503/504 error files", count=3)
    config = _one(HTTP_FRONTEND_BIND, lambda m: m.group(1) + _frontend_rules(m.group(2), retry_after_s),
                  config, "the HTTP frontend's bind")
    config = _liveness_rule(config, healthz_path)
    if "timeout http-request" not in config:
        config = _one(DEFAULTS, f"defaults\n    timeout http-request {http_request_timeout_s}s", config,
                      "the defaults section")
    return config


def state_dirs_serving(base: str, host: str, port: int, since: float) -> list[str]:
    """The directories under ``base`` (Ray's HAProxy state, one per node) holding a config
    this wrapper wrote since ``since`` (a time.time()) for the HTTP frontend on host:port:
    what a run that served there leaves, for it to remove once its HAProxy is gone."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        config = os.path.join(base, name, STRATA_CONFIG)
        try:
            if os.path.getmtime(config) < since:
                continue
            with open(config) as f:
                match = HTTP_FRONTEND_BIND.search(f.read())
        except OSError:
            continue
        if match and match.group(1).rstrip().endswith(f"bind {host}:{port}"):
            found.append(os.path.join(base, name))
    return found


def _write(path: str, text: str) -> None:
    staging = f"{path}.{os.getpid()}.tmp"  # Ray may start two at once (a reload)
    with open(staging, "w") as f:
        f.write(text)
    os.replace(staging, path)


def main(argv: list[str]) -> int:
    """Rewrite the ``-f`` config and exec the real HAProxy on the copy."""
    binary = os.environ.get("STRATA_HAPROXY_BINARY")
    if not binary:
        print("strata: STRATA_HAPROXY_BINARY is not set: serve_app/run.py sets it", file=sys.stderr)
        return 2
    args = list(argv)
    if "-f" in args:
        index = args.index("-f") + 1
        directory = os.path.dirname(args[index])
        unavailable_file = os.path.join(directory, UNAVAILABLE_FILE)
        retry_after_s = int(os.environ.get("STRATA_RETRY_AFTER_S") or 1)
        try:
            with open(args[index]) as f:
                config = override(f.read(), host=os.environ.get("STRATA_HAPROXY_HOST") or "127.0.0.1",
                                  unavailable_file=unavailable_file,
                                  http_request_timeout_s=int(os.environ.get("STRATA_HTTP_REQUEST_TIMEOUT_S") or 30),
                                  retry_after_s=retry_after_s,
                                  healthz_path=os.environ.get("STRATA_HEALTHZ_PATH") or "/healthz")
            _write(unavailable_file, unavailable_response(retry_after_s))
        except (OSError, ValueError) as e:
            print(f"strata: not starting HAProxy with Ray's unchanged config: {e}", file=sys.stderr)
            return 2
        args[index] = os.path.join(directory, STRATA_CONFIG)
        _write(args[index], config)
    os.execv(binary, [binary, *args])
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
