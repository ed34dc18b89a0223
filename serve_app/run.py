"""`python -m serve_app.run CONFIG`: `serve run CONFIG` that also stops cleanly on SIGTERM.

`serve run` shuts Serve and its local Ray down cleanly on Ctrl-C (SIGINT), but
SIGTERM (what `kill`, systemd and `make` send) meets the handlers `ray.init`
installs and ends the process abruptly. So `serve run` runs as a child here, and
a SIGTERM to this process reaches it as the Ctrl-C it handles well.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    """Run `serve run argv...` until it exits; returns its exit status."""
    child = subprocess.Popen(
        [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", *argv],
        # Started in the background, a shell hands us SIGINT ignored; the child
        # needs it back to turn it into its clean KeyboardInterrupt shutdown.
        preexec_fn=_default_sigint,
    )
    # A terminal's Ctrl-C already reaches the child (same process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGINT))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
