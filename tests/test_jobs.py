"""JobStore: durable job rows, leases, cancel, paging, expiry.

Every test runs on a real SQLite file in a tmp dir. The same tests run against
PostgreSQL when one can be had: ``STRATA_TEST_POSTGRES_URL`` names a server
(its ``strata_jobs`` table is dropped before each test), or -- when a driver
(``psycopg``) is installed, the PostgreSQL server binaries are present and the
tests do not run as root -- a throwaway server started in a tmp dir. Otherwise
the PostgreSQL half is skipped.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from serve_app.jobs import Job, JobStatus, JobStore, QueueFull, Renewal
from serve_app.run import free_port

ROOT = Path(__file__).resolve().parent.parent
UTC = timezone.utc
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A settable clock, so lease tests need no sleeping."""

    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# ------------------------------------------------------------------ backends


def _postgres_unavailable() -> str | None:
    """Why the PostgreSQL half cannot run here (None: it can)."""
    if os.environ.get("STRATA_TEST_POSTGRES_URL"):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no PostgreSQL driver (pip install 'psycopg[binary]') and no STRATA_TEST_POSTGRES_URL"
    if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        return "no PostgreSQL server binaries and no STRATA_TEST_POSTGRES_URL"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "PostgreSQL refuses to run as root and runuser is missing; set STRATA_TEST_POSTGRES_URL"
    return None


_NO_POSTGRES = _postgres_unavailable()
# Decided at collection, so a machine without PostgreSQL reports one skip, not one per test.
BACKENDS = ["sqlite"] + ([] if _NO_POSTGRES else ["postgresql"])


def test_store_tests_also_run_on_postgresql():
    if _NO_POSTGRES:
        pytest.skip(_NO_POSTGRES)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL URL: the given one, or a throwaway server in a tmp dir."""
    url = os.environ.get("STRATA_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))[-1]).parent
    home = Path(tempfile.mkdtemp(prefix="strata-pg-"))  # short: it holds the socket
    data, port = home / "data", free_port()
    # PostgreSQL refuses to run as root: as root, run it as the system's postgres user.
    as_server = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_server, bindir / "initdb", "-D", data, "-U", "strata", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True,
    )
    subprocess.run(
        [*as_server, bindir / "pg_ctl", "-D", data, "-w", "-l", home / "log",
         "-o", f"-k {home} -p {port} -c listen_addresses='' -c fsync=off", "start"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://strata@/postgres?host={home}&port={port}"
    finally:
        subprocess.run([*as_server, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'jobs.db'}"
    url = request.getfixturevalue("postgres_server")
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS strata_jobs")
    engine.dispose()
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url, clock):
    with JobStore(store_url, clock=clock) as s:
        yield s


def _make(store: JobStore, n: int, clock: Clock | None = None, **kwargs) -> list[Job]:
    jobs = []
    for i in range(n):
        jobs.append(store.create("layers", {"n": i}, **kwargs))
        if clock is not None:
            clock.advance(1)
    return jobs


# ------------------------------------------------------------------ creating and reading


def test_created_job_is_queued_with_its_params(store, clock):
    job = store.create("layers", {"layers": 4, "prompt": "a cat"}, owner="key-1")
    assert job.status is JobStatus.QUEUED
    assert (job.kind, job.params, job.owner) == ("layers", {"layers": 4, "prompt": "a cat"}, "key-1")
    assert (job.progress, job.attempts, job.cancel_requested) == (0.0, 0, False)
    assert job.created_at == clock.now
    assert job.started_at is job.finished_at is job.result is job.error is None
    assert store.get(job.id) == job


def test_job_ids_are_unguessable(store):
    ids = {job.id for job in _make(store, 20)}
    assert len(ids) == 20
    assert all(len(job_id) >= 22 for job_id in ids)  # 128 random bits, URL-safe


def test_times_come_back_timezone_aware_utc(store, clock):
    clock.now = datetime(2030, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=30)
    got = store.get(job.id)
    for value in (got.created_at, got.started_at, got.lease_expires_at):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert got.created_at == datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    assert got.lease_expires_at == got.started_at + timedelta(seconds=30)


def test_get_of_an_unknown_job_is_none(store):
    assert store.get("no-such-job") is None


def test_jobs_survive_reopening_the_database(store_url, clock):
    with JobStore(store_url, clock=clock) as first:
        job = first.create("layers", {"layers": 3})
        first.claim(job.id, "w1", lease_s=30)
        first.renew(job.id, "w1", 30, progress=0.25, step=5, total_steps=20)
    with JobStore(store_url, clock=clock) as second:
        again = second.get(job.id)
    assert again is not None
    assert (again.status, again.progress, again.step, again.total_steps) == (JobStatus.RUNNING, 0.25, 5, 20)
    assert again.params == {"layers": 3}


def test_sqlite_store_creates_its_folder_and_uses_wal(tmp_path):
    path = tmp_path / "deep" / "er" / "jobs.db"
    JobStore(f"sqlite:///{path}").close()
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_store_opened_during_another_write_waits_for_it(tmp_path):
    # SQLite refuses the switch to WAL at once, busy timeout or not, while another
    # connection writes in the old journal mode -- as when two processes open a
    # new file together (a CI run once failed so).
    path = tmp_path / "jobs.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        opening = pool.submit(JobStore, f"sqlite:///{path}", busy_timeout_s=30)
        # It must still be waiting after a while, not have failed at once.
        concurrent.futures.wait([opening], timeout=0.5)
        assert not opening.done()
        writer.execute("COMMIT")
        with opening.result(timeout=30) as store:
            store.create("layers", {})
            assert store.count(JobStatus.QUEUED) == 1
    writer.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------ the queue bound


def test_queue_bound_refuses_past_max_queued(store):
    _make(store, 3, max_queued=3)
    with pytest.raises(QueueFull) as refused:
        store.create("layers", {}, max_queued=3)
    assert (refused.value.queued, refused.value.limit) == (3, 3)
    assert store.count(JobStatus.QUEUED) == 3


def test_queue_bound_counts_only_queued_jobs_of_the_kind(store):
    running, _queued = _make(store, 2, max_queued=2)
    store.claim(running.id, "w1", lease_s=30)
    store.create("other-kind", {}, max_queued=2)
    store.create("layers", {}, max_queued=2)  # one running + one queued: room for one more
    with pytest.raises(QueueFull):
        store.create("layers", {}, max_queued=2)


# ------------------------------------------------------------------ leases


def test_claim_runs_a_queued_job_under_a_lease(store, clock):
    job = store.create("layers", {})
    clock.advance(2)
    claimed = store.claim(job.id, "w1", lease_s=30)
    assert claimed.status is JobStatus.RUNNING
    assert claimed.lease_owner == "w1"
    assert claimed.started_at == clock.now
    assert claimed.lease_expires_at == clock.now + timedelta(seconds=30)
    assert claimed.attempts == 1


def test_claimed_job_is_not_claimed_again_until_its_lease_lapses(store, clock):
    job = store.create("layers", {})
    assert store.claim(job.id, "w1", lease_s=30) is not None
    clock.advance(29)
    assert store.claim(job.id, "w2", lease_s=30) is None
    clock.advance(1)
    assert store.claim(job.id, "w2", lease_s=30).lease_owner == "w2"


def test_reclaim_after_a_lapse_keeps_started_at_and_counts_attempts(store, clock):
    job = store.create("layers", {})
    first = store.claim(job.id, "w1", lease_s=10)
    store.renew(job.id, "w1", 10, progress=0.6, step=30)
    clock.advance(60)
    second = store.claim(job.id, "w2", lease_s=10)
    assert second.started_at == first.started_at
    assert second.attempts == 2
    assert (second.progress, second.step) == (0.0, None)  # the new attempt starts over


def test_released_job_is_dispatchable_at_once_and_counts_its_attempt(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=30)
    assert store.release(job.id, "w1") is True
    assert [j.id for j in store.dispatchable()] == [job.id]
    again = store.claim(job.id, "w2", lease_s=30, max_attempts=2)
    assert (again.lease_owner, again.attempts) == ("w2", 2)
    assert store.release(job.id, "w1") is False  # no longer w1's to give up
    assert store.release(job.id, "w2") is True
    assert store.claim(job.id, "w3", lease_s=30, max_attempts=2) is None
    assert store.get(job.id).status is JobStatus.FAILED  # max_attempts still bounds the retries


def test_renewed_lease_keeps_the_job_from_being_reclaimed(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    for _ in range(5):
        clock.advance(8)
        assert store.renew(job.id, "w1", 10) is Renewal.HELD
    assert store.claim(job.id, "w2", lease_s=10) is None
    assert store.dispatchable() == []


def test_renew_records_progress_and_steps(store):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    assert store.renew(job.id, "w1", 10, progress=0.4, step=20, total_steps=50)
    got = store.get(job.id)
    assert (got.progress, got.step, got.total_steps) == (0.4, 20, 50)
    store.renew(job.id, "w1", 10, progress=7)
    assert store.get(job.id).progress == 1.0  # clamped


def test_renew_after_the_lease_was_taken_over_reports_lost(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    clock.advance(11)
    store.claim(job.id, "w2", lease_s=10)
    result = store.renew(job.id, "w1", 10, progress=0.9)
    assert result is Renewal.LOST and not result
    assert store.get(job.id).progress == 0.0


def test_finish_by_a_former_lease_holder_is_refused(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    clock.advance(11)
    store.claim(job.id, "w2", lease_s=10)
    assert store.finish(job.id, "w1", JobStatus.SUCCEEDED, result={"from": "w1"}) is False
    assert store.finish(job.id, "w2", JobStatus.SUCCEEDED, result={"from": "w2"}) is True
    assert store.get(job.id).result == {"from": "w2"}


def test_finish_records_the_outcome_and_ends_the_lease(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    clock.advance(5)
    assert store.finish(job.id, "w1", "succeeded", result={"layers": [{"index": 1}]})
    got = store.get(job.id)
    assert got.status is JobStatus.SUCCEEDED and got.terminal
    assert (got.progress, got.result, got.error) == (1.0, {"layers": [{"index": 1}]}, None)
    assert got.finished_at == clock.now
    assert got.lease_expires_at is None
    clock.advance(3600)
    assert store.dispatchable() == []
    assert store.claim(job.id, "w2", lease_s=10) is None


def test_failed_job_keeps_its_error(store):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    assert store.finish(job.id, "w1", JobStatus.FAILED, error="CUDA out of memory")
    got = store.get(job.id)
    assert (got.status, got.error, got.result) == (JobStatus.FAILED, "CUDA out of memory", None)


def test_finish_refuses_a_status_that_is_not_terminal(store):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    with pytest.raises(ValueError):
        store.finish(job.id, "w1", JobStatus.QUEUED)


def test_lapsed_job_is_given_up_after_max_attempts(store, clock):
    job = store.create("layers", {})
    for attempt in range(3):
        assert store.claim(job.id, f"w{attempt}", lease_s=10, max_attempts=3) is not None
        clock.advance(11)
    assert store.claim(job.id, "w9", lease_s=10, max_attempts=3) is None
    got = store.get(job.id)
    assert got.status is JobStatus.FAILED
    assert "3 attempts" in got.error
    assert got.attempts == 3


def test_dispatchable_lists_queued_and_lapsed_jobs_oldest_first(store, clock):
    lapsed, held, queued_a, queued_b, done = _make(store, 5, clock)
    store.claim(lapsed.id, "w1", lease_s=5)
    store.claim(held.id, "w1", lease_s=60)
    store.claim(done.id, "w1", lease_s=60)
    store.finish(done.id, "w1", JobStatus.SUCCEEDED)
    clock.advance(10)
    assert [j.id for j in store.dispatchable()] == [lapsed.id, queued_a.id, queued_b.id]
    assert [j.id for j in store.dispatchable(limit=2)] == [lapsed.id, queued_a.id]
    assert [j.id for j in store.dispatchable(now=clock.now + timedelta(seconds=60))] == [
        lapsed.id, held.id, queued_a.id, queued_b.id,
    ]


# ------------------------------------------------------------------ cancel and delete


def test_cancel_of_queued_job_is_immediate(store, clock):
    job = store.create("layers", {})
    cancelled = store.request_cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.finished_at == clock.now
    assert store.claim(job.id, "w1", lease_s=10) is None
    assert store.dispatchable() == []


def test_cancel_of_running_job_is_reported_to_its_runner(store):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=30)
    requested = store.request_cancel(job.id)
    assert (requested.status, requested.cancel_requested) == (JobStatus.RUNNING, True)
    answer = store.renew(job.id, "w1", 30, progress=0.5)
    assert answer is Renewal.CANCEL_REQUESTED and not answer
    assert store.finish(job.id, "w1", JobStatus.CANCELLED)
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_of_a_job_whose_lease_lapsed_is_immediate(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    clock.advance(11)
    assert store.request_cancel(job.id).status is JobStatus.CANCELLED
    assert store.renew(job.id, "w1", 10) is Renewal.LOST


def test_lapsed_job_with_a_cancel_request_ends_cancelled_instead_of_rerunning(store, clock):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    store.request_cancel(job.id)  # while w1 held it ... then w1 died
    clock.advance(11)
    assert store.claim(job.id, "w2", lease_s=10) is None
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_leaves_a_finished_job_as_it_is(store):
    job = store.create("layers", {})
    store.claim(job.id, "w1", lease_s=10)
    store.finish(job.id, "w1", JobStatus.SUCCEEDED, result={"ok": True})
    got = store.request_cancel(job.id)
    assert (got.status, got.cancel_requested) == (JobStatus.SUCCEEDED, False)


def test_cancel_of_an_unknown_job_is_none(store):
    assert store.request_cancel("no-such-job") is None


def test_delete_removes_the_row(store):
    job = store.create("layers", {})
    assert store.delete(job.id) is True
    assert store.get(job.id) is None
    assert store.delete(job.id) is False


# ------------------------------------------------------------------ listing, counting, expiry


def test_list_pages_newest_first(store, clock):
    jobs = _make(store, 7, clock)
    newest_first = [j.id for j in reversed(jobs)]
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(limit=3, cursor=cursor)
        seen += [j.id for j in page]
        pages += 1
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3


def test_list_pages_do_not_shift_when_jobs_are_created_meanwhile(store, clock):
    jobs = _make(store, 4, clock)
    first, cursor = store.list(limit=2)
    store.create("layers", {})
    second, _ = store.list(limit=2, cursor=cursor)
    assert [j.id for j in first + second] == [j.id for j in reversed(jobs)]


def test_list_filters_by_status_and_owner(store, clock):
    a, b, c = _make(store, 3, clock, owner="key-a")
    d = store.create("layers", {}, owner="key-b")
    store.request_cancel(b.id)
    assert [j.id for j in store.list(status=JobStatus.QUEUED)[0]] == [d.id, c.id, a.id]
    assert [j.id for j in store.list(status="cancelled")[0]] == [b.id]
    assert [j.id for j in store.list(owner="key-a")[0]] == [c.id, b.id, a.id]
    assert [j.id for j in store.list(status="queued", owner="key-b")[0]] == [d.id]


def test_store_made_before_job_owners_gains_the_column_and_keeps_its_jobs(store_url):
    # The table as a Strata without `owner` made it, holding one job.
    from sqlalchemy import MetaData, Table, create_engine

    from serve_app.jobs import jobs_table

    old_table = Table(jobs_table.name, MetaData(),
                      *[column._copy() for column in jobs_table.columns if column.name != "owner"])
    if store_url.startswith("sqlite"):
        (Path(store_url.removeprefix("sqlite:///")).parent).mkdir(parents=True, exist_ok=True)
    engine = create_engine(store_url)
    old_table.create(engine)
    with engine.begin() as conn:
        conn.execute(old_table.insert().values(id="old-job-0000000000001", kind="layers", status="succeeded",
                                               progress=1.0, created_at=datetime.now(UTC), params={},
                                               attempts=1, cancel_requested=False))
    engine.dispose()
    with JobStore(store_url) as store:
        old = store.get("old-job-0000000000001")
        assert old is not None and old.status is JobStatus.SUCCEEDED and old.owner is None
        mine = store.create("layers", {}, owner="key-a")
        assert [j.id for j in store.list(owner="key-a")[0]] == [mine.id]
        assert {j.id for j in store.list()[0]} == {mine.id, old.id}


def test_list_refuses_a_malformed_cursor(store):
    with pytest.raises(ValueError):
        store.list(cursor="not-a-cursor!")


def test_count_counts_jobs_by_status(store):
    queued, running, done = _make(store, 3)
    store.claim(running.id, "w1", lease_s=10)
    store.claim(done.id, "w1", lease_s=10)
    store.finish(done.id, "w1", JobStatus.SUCCEEDED)
    counts = {status: store.count(status) for status in JobStatus}
    assert counts == {
        JobStatus.QUEUED: 1, JobStatus.RUNNING: 1, JobStatus.SUCCEEDED: 1,
        JobStatus.FAILED: 0, JobStatus.CANCELLED: 0,
    }
    assert store.count() == 3


def test_expired_lists_finished_jobs_older_than_the_retention(store, clock):
    old_done, old_cancelled, recent_done, running, queued = _make(store, 5)
    for job in (old_done, recent_done, running):
        store.claim(job.id, "w1", lease_s=1e6)
    store.finish(old_done.id, "w1", JobStatus.SUCCEEDED)
    store.request_cancel(old_cancelled.id)
    clock.advance(3000)
    store.finish(recent_done.id, "w1", JobStatus.FAILED, error="x")
    clock.advance(1000)
    assert store.expired(retention_s=3600) == [old_done.id, old_cancelled.id]
    assert store.expired(retention_s=3600, now=clock.now + timedelta(hours=1)) == [
        old_done.id, old_cancelled.id, recent_done.id,
    ]


# ------------------------------------------------------------------ several processes

_CHILD = r"""
import json, sys
from serve_app.jobs import JobStore, QueueFull
url, mode, who, n, bound = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
store = JobStore(url)
todo = [job.id for job in store.dispatchable(limit=1000)] if mode == "claim" else []
print("ready", flush=True)
sys.stdin.readline()  # start together
won = []
if mode == "claim":
    for job_id in todo:  # both processes try every job
        if store.claim(job_id, who, lease_s=600) is not None:
            won.append(job_id)
else:
    for _ in range(n):
        try:
            won.append(store.create("layers", {}, max_queued=bound).id)
        except QueueFull:
            pass
print(json.dumps(won), flush=True)
"""


def _race(url: str, mode: str, processes: int = 2, n: int = 0, bound: int = 0) -> list[list[str]]:
    """Run the child script in separate processes that start their work together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, mode, f"worker-{i}", str(n), str(bound)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        for i in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert all(child.returncode == 0 for child in children)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def test_two_processes_cannot_claim_the_same_job(store_url):
    with JobStore(store_url) as store:
        ids = {job.id for job in _make(store, 40)}
        first, second = _race(store_url, "claim")
        assert set(first).isdisjoint(second)
        assert set(first) | set(second) == ids
        assert all(job.attempts == 1 for job in store.list(limit=100)[0])


def test_concurrent_creators_in_two_processes_do_not_exceed_the_bound(store_url):
    # 2 x 15 tries against a bound of 20: both must create, and together exactly 20.
    first, second = _race(store_url, "create", n=15, bound=20)
    assert len(first) + len(second) == 20
    with JobStore(store_url) as store:
        assert store.count(JobStatus.QUEUED) == 20
