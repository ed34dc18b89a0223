"""`python -m serve_app.run CONFIG`: `serve run CONFIG` that also stops on SIGTERM.

`serve run` shuts Serve and its local Ray down on Ctrl-C but dies abruptly on
SIGTERM (what `kill`, systemd and `make` send), which can leave Ray processes
behind. Here SIGTERM takes the same clean path as Ctrl-C.
"""

from __future__ import annotations

import signal
import sys

from ray.serve.scripts import cli


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> None:
    """Run `serve run` with `argv` after it, handling SIGTERM like Ctrl-C."""
    signal.signal(signal.SIGTERM, _stop)
    cli.main(args=["run", *argv], prog_name="serve")


if __name__ == "__main__":
    main(sys.argv[1:])
