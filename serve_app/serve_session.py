"""`serve run` in a process session of its own, stopped cleanly however the launcher is
stopped, with nothing it started left behind.

Ray starts every worker in a process group of its own, so a signal to the launcher's
process group (what `timeout`, supervisors and CI runners send) never reaches them,
while it does reach `serve run`'s own Ray processes mid-shutdown; Serve's HAProxy,
a worker's child, then outlives it and holds the HTTP port. So `serve run` runs in a
new session: every process it starts, workers included, stays in that session (none
calls setsid), no outside signal reaches any of it, and this module alone tells it to
stop. Once `serve run` exits, whatever of its session is still alive is provably ours
and is ended.

A run record under the data directory (`RunRecord`) names the session, so the next
start ends what a launcher killed with SIGKILL left behind; a port held by anything
else is reported in one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

# How long what Ray's own shutdown left is given to exit before it is sent SIGTERM,
# and then SIGKILL: Ray ends its processes itself as `serve run` exits.
LEFTOVER_GRACE_S = 5.0
# Past the deployments' graceful shutdown, how long Serve and Ray get to shut down.
SHUTDOWN_MARGIN_S = 30.0
# Serve's default graceful_shutdown_timeout_s, for deployments that set none.
SERVE_GRACEFUL_SHUTDOWN_S = 20.0

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def session_processes(session_id: int, since: float) -> list[psutil.Process]:
    """The live processes of session `session_id` created at or after `since` (epoch
    seconds): what a `serve run` started then, in a session of its own, has running."""
    members = []
    for process in psutil.process_iter():
        try:
            if (process.pid != os.getpid() and os.getsid(process.pid) == session_id
                    and process.create_time() >= since - 1.0):  # create_time has tick resolution
                members.append(process)
        except (OSError, psutil.Error):  # gone since the listing, or not ours to see
            continue
    return members


def describe(processes: Iterable[psutil.Process]) -> str:
    """`PID name` of each process, comma-separated."""
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} {process.name()}")
        except psutil.Error:
            names.append(str(process.pid))
    return ", ".join(names)


def end_processes(processes: list[psutil.Process], grace_s: float = LEFTOVER_GRACE_S) -> list[psutil.Process]:
    """End `processes`: SIGTERM, and SIGKILL to those still alive after `grace_s`.
    Returns the ones that had to be signalled at all (those that exited by themselves
    within the first `grace_s` are not)."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    signalled = list(alive)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        if not alive:
            break
    return signalled


@dataclass
class RunRecord:
    """What a running launcher writes under its data directory, so a later start can
    tell its leftovers (processes of `session_id` created since `started_at`) from
    anybody else's, and a launcher still running from one it can replace."""

    launcher_pid: int
    launcher_started_at: float
    session_id: int
    started_at: float

    @classmethod
    def read(cls, path: Path) -> RunRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):  # none, or not one we wrote
            return None

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(path)  # a reader never sees half a record

    def launcher_alive(self) -> bool:
        """Whether the launcher that wrote this still runs (the same PID and start time)."""
        try:
            return abs(psutil.Process(self.launcher_pid).create_time() - self.launcher_started_at) < 1.0
        except psutil.Error:
            return False

    def leftovers(self) -> list[psutil.Process]:
        """What of the recorded run is still alive."""
        return session_processes(self.session_id, self.started_at)


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind `host:port` now (as Serve's would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no holder
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on TCP `port`, where this user may see it."""
    try:
        connections = psutil.net_connections("tcp")
    except psutil.Error:  # some platforms list other users' sockets to root only
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(connection.pid)
    return None


def held_port_message(host: str, port: int, what: str) -> str:
    """One line saying who holds `port` (the `what` Strata needs it for) and how to free it."""
    holder = port_holder(port)
    if holder is None:
        return (f"Port {port} ({what}) on {host} is in use by another process; "
                f"`lsof -i :{port}` or `ss -ltnp 'sport = :{port}'` shows which.")
    return (f"Port {port} ({what}) on {host} is in use by PID {holder.pid} ({describe([holder]).split(' ', 1)[-1]}), "
            f"not by a run Strata recorded; free it with `kill {holder.pid}`, or serve on another port.")


class ServeSession:
    """`serve run ARGV` in a session of its own: `stop` asks it to shut down cleanly
    (the Ctrl-C it handles), `wait` returns once it has exited and nothing it started
    is left, ending what is (bounded in time, saying what it ended)."""

    def __init__(self, argv: list[str], env: dict[str, str], stop_timeout_s: float,
                 say: Callable[[str], None]):
        self.argv = argv
        self.env = env
        self.stop_timeout_s = stop_timeout_s
        self.say = say
        self.child: subprocess.Popen | None = None
        self.started_at = 0.0
        self._stop_deadline: float | None = None

    def start(self) -> subprocess.Popen:
        """Start `serve run`; it dies with this process (SIGINT to it, Linux) if this one is killed."""
        launcher = os.getpid()

        def in_child() -> None:
            # Started in the background, a shell hands us SIGINT ignored; the child
            # needs it back to turn it into its clean KeyboardInterrupt shutdown.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if sys.platform.startswith("linux"):
                # SIGKILL of the launcher (or of its process group) reaches no one in
                # this session: the kernel turns it into a clean stop of `serve run`.
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
                if os.getppid() != launcher:  # the launcher died before the line above
                    os._exit(1)

        self.started_at = time.time()
        self.child = subprocess.Popen(
            [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", *self.argv],
            env=self.env, start_new_session=True, preexec_fn=in_child)
        return self.child

    @property
    def session_id(self) -> int:
        assert self.child is not None, "not started"
        return self.child.pid  # the session's leader: start_new_session made it one

    def stop(self) -> None:
        """Ask `serve run` to shut down cleanly (once: a stop that reaches us twice, from a
        process group and from make, say, is one stop); `wait` bounds how long it may take."""
        if self.child is None or self._stop_deadline is not None:
            return
        self._stop_deadline = time.monotonic() + self.stop_timeout_s
        self.say(f"Stopping Strata: Serve finishes what it is serving and Ray shuts down "
                 f"(at most {self.stop_timeout_s:g} s)")
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signal.SIGINT)

    def wait(self) -> int:
        """Wait for `serve run` to exit (past the stop's deadline it is ended, with its
        whole session), end what of its session is left, and return its exit status
        (128 + N for a signal N, as a shell reports it)."""
        assert self.child is not None, "not started"
        while True:
            deadline = self._stop_deadline
            try:
                # In slices while no stop was asked, so that a stop's deadline counts.
                status = self.child.wait(timeout=1.0 if deadline is None else max(0.0, deadline - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    self.say(f"Serve did not shut down within {self.stop_timeout_s:g} s; ending its processes")
                    self.child.kill()
                    status = self.child.wait()
                    break
        self.end_leftovers()
        return 128 - status if status < 0 else status

    def end_leftovers(self) -> None:
        """End whatever of this session outlived `serve run`, and say what that was."""
        ended = end_processes(session_processes(self.session_id, self.started_at))
        if ended:
            self.say(f"Ended {len(ended)} process(es) Ray left behind: {describe(ended)}")
