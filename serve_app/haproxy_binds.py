#!/usr/bin/env python3
"""Ray Serve's HAProxy, with its stats page and metrics on Strata's host, not on every interface.

Ray 2.60's HAProxy config binds the stats page (``listen stats``: ``bind *:8404``) and
the Prometheus metrics (``bind :9101``) on every interface, whatever
``http_options.host`` says, and opens its admin socket to every local user
(``mode 666 level admin``); nothing in Ray configures either. ``make run`` points
``RAY_SERVE_HAPROXY_BINARY_PATH`` here (serve_app/run.py): Ray starts this with the
arguments it gives HAProxy; it writes a copy of the config beside Ray's with those
binds on ``STRATA_HAPROXY_HOST`` and the socket for its owner only, then becomes the
real HAProxy (``STRATA_HAPROXY_BINARY``) on that copy. Other arguments pass as given.

If Ray's config does not hold the lines this rewrites (another Ray), it refuses to
start HAProxy rather than serve with those ports open; Ray then reports that HAProxy
did not start, with this message in its log.

Only the standard library: Ray runs it as an executable, with any ``python3``.
"""

from __future__ import annotations

import os
import re
import sys

# The lines of Ray's template that bind every interface, and the world-open socket.
STATS_BIND = re.compile(r"^(\s*)bind \*:(\d+)\s*$", re.MULTILINE)
METRICS_BIND = re.compile(r"^(\s*)bind :(\d+)\s*$", re.MULTILINE)
ADMIN_SOCKET_MODE = re.compile(r"^(\s*stats socket \S+) mode 666 ", re.MULTILINE)


def confine(config: str, host: str) -> str:
    """Ray's HAProxy ``config`` with the stats and metrics binds on ``host`` and the
    admin socket for its owner only; ValueError if any of those lines is missing."""
    rewritten = config
    for pattern, what in ((STATS_BIND, "the stats page's bind"), (METRICS_BIND, "the metrics' bind")):
        rewritten, count = pattern.subn(lambda m: f"{m.group(1)}bind {host}:{m.group(2)}", rewritten)
        if count != 1:
            raise ValueError(f"{what} is not in Ray's HAProxy config as Ray 2.60 writes it ({count} found)")
    rewritten, count = ADMIN_SOCKET_MODE.subn(r"\1 mode 600 ", rewritten)
    if count != 1:
        raise ValueError(f"the admin socket is not in Ray's HAProxy config as Ray 2.60 writes it ({count} found)")
    return rewritten


def main(argv: list[str]) -> int:
    """Rewrite the ``-f`` config and exec the real HAProxy on the copy."""
    binary = os.environ.get("STRATA_HAPROXY_BINARY")
    host = os.environ.get("STRATA_HAPROXY_HOST") or "127.0.0.1"
    if not binary:
        print("strata: STRATA_HAPROXY_BINARY is not set: serve_app/run.py sets it", file=sys.stderr)
        return 2
    args = list(argv)
    if "-f" in args:
        index = args.index("-f") + 1
        source = args[index]
        try:
            with open(source) as f:
                confined = confine(f.read(), host)
        except (OSError, ValueError) as e:
            print(f"strata: not starting HAProxy with its ports open: {e}", file=sys.stderr)
            return 2
        target = os.path.join(os.path.dirname(source), "haproxy.strata.cfg")
        staging = f"{target}.{os.getpid()}.tmp"  # Ray may start two at once (a reload)
        with open(staging, "w") as f:
            f.write(confined)
        os.replace(staging, target)
        args[index] = target
    os.execv(binary, [binary, *args])
    return 127  # not reached: execv replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
