"""Durable job records: a job is a row first, work second.

The ingress is the only writer. It creates a row (and writes the input), then
dispatches the job to a model replica under a *lease*: ``claim`` moves the job to
``running`` and records who holds it until when; the dispatcher ``renew``s the
lease with each progress event and ``finish``es the job with its outcome. A job
whose lease lapsed (the ingress restarted, the replica died) is listed again by
``dispatchable`` and claimed again, so no accepted job is lost.

Backends: SQLite (the embedded default, one file in the data directory, shared by
the processes of one machine) and PostgreSQL (many ingress replicas on many
nodes). Only portable SQL is used; every state change is a conditional
``UPDATE ... WHERE <expected state>`` whose row count says whether it won, so two
claimers -- threads, processes or nodes -- can never both hold one job.

Times are timezone-aware UTC in and out (SQLite stores them naive, in UTC).
Lease expiry is judged by the clock of the process that asks, so the nodes of a
PostgreSQL deployment need synchronised clocks (NTP); leases of tens of seconds
make ordinary skew harmless.

A lease owner string must be unique *per dispatch* (e.g. ``f"{replica}:{uuid4()}"``),
not merely per process: ``finish`` and ``renew`` trust the owner string, so an old
dispatch of the same process must not be able to pass for a newer one.

Typical life::

    store = JobStore("sqlite:///data/jobs.db")
    job_id = new_job_id()
    storage.put(f"jobs/{job_id}/input.png", data)            # input first ...
    job = store.create("layers", params, max_queued=32, job_id=job_id)  # ... then the row
    job = store.claim(job.id, owner, lease_s=30)             # None: someone else has it
    state = store.renew(job.id, owner, 30, progress=0.5)     # per progress event
    if state is Renewal.CANCEL_REQUESTED: store.finish(job.id, owner, JobStatus.CANCELLED)
    elif state is Renewal.LOST: ...                           # stop; drop the work
    store.release(job.id, owner)                              # the worker died: dispatch again now
    store.finish(job.id, owner, JobStatus.SUCCEEDED, result={...})
    for job_id in store.expired(retention_s=86400):          # files first, then the row
        storage.delete_prefix(f"jobs/{job_id}"); store.delete(job_id)
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeDecorator

__all__ = [
    "JOB_ID_PATTERN",
    "Job",
    "JobStatus",
    "JobStore",
    "QueueFull",
    "Renewal",
    "new_job_id",
]

UTC = timezone.utc


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    def __str__(self) -> str:  # "queued", not "JobStatus.QUEUED"
        return self.value


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Renewal(enum.Enum):
    """What ``JobStore.renew`` found. Truthy only for ``HELD``: "keep working"."""

    HELD = "held"
    """The lease was extended; carry on."""
    CANCEL_REQUESTED = "cancel_requested"
    """The lease was extended, but a cancel was requested: stop the work and
    ``finish(..., JobStatus.CANCELLED)`` (the lease is still yours)."""
    LOST = "lost"
    """The job is no longer running under this owner (the lease lapsed and the job
    was claimed again, cancelled, or deleted): stop and write nothing."""

    def __bool__(self) -> bool:
        return self is Renewal.HELD


class QueueFull(Exception):
    """``create`` refused a job: ``limit`` jobs of this kind are already queued."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"{queued} jobs queued (limit {limit})")
        self.queued = queued
        self.limit = limit


def new_job_id() -> str:
    """An unguessable job id: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


# What a job id can be (new_job_id's, with room): anything else names no job, and is
# turned away before the store is asked.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job row (not a live ORM object)."""

    id: str
    kind: str
    status: JobStatus
    progress: float
    step: int | None
    total_steps: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: dict[str, Any]
    error: str | None
    result: dict[str, Any] | None
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    owner: str | None

    @property
    def terminal(self) -> bool:
        return self.status.terminal


# --------------------------------------------------------------------------- schema


class _UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out; stored naive (UTC) where the database has no zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # Stored as text; one fixed format keeps text order equal to time order.
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_JSON = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
_metadata = MetaData()

jobs_table = Table(
    "strata_jobs",
    _metadata,
    # Insertion order: the list order (newest first) and the dispatch order (oldest first).
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("step", Integer, nullable=True),
    Column("total_steps", Integer, nullable=True),
    Column("created_at", _UTCDateTime, nullable=False),
    Column("started_at", _UTCDateTime, nullable=True),
    Column("finished_at", _UTCDateTime, nullable=True),
    Column("params", _JSON, nullable=False),
    Column("error", Text, nullable=True),
    Column("result", _JSON, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_expires_at", _UTCDateTime, nullable=True),
    Column("owner", String(200), nullable=True),
    Index("ix_strata_jobs_status_seq", "status", "seq"),
    Index("ix_strata_jobs_owner_seq", "owner", "seq"),
    Index("ix_strata_jobs_finished_at", "finished_at"),
)
_t = jobs_table

# PostgreSQL advisory-lock keys (64-bit, stable across processes and versions).
_SCHEMA_LOCK = zlib.crc32(b"strata.jobs.schema")


def _held_by(job_id: str, owner: str) -> tuple:
    """WHERE clauses of a job that is running under ``owner``'s lease: what renewing,
    releasing and finishing it require (anything else means the lease was lost)."""
    return _t.c.id == job_id, _t.c.status == JobStatus.RUNNING.value, _t.c.lease_owner == owner


def _queue_lock_key(kind: str) -> int:
    return zlib.crc32(b"strata.jobs.queue:" + kind.encode())


def _row_to_job(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        status=JobStatus(row["status"]),
        progress=float(row["progress"]),
        step=row["step"],
        total_steps=row["total_steps"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        params=dict(row["params"] or {}),
        error=row["error"],
        result=row["result"],
        attempts=int(row["attempts"]),
        cancel_requested=bool(row["cancel_requested"]),
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        owner=row["owner"],
    )


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"j1:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, seq = raw.partition(":")
        if tag != "j1":
            raise ValueError
        return int(seq)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValueError(f"invalid cursor: {cursor!r}") from None


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- store


def _enable_wal(cursor: sqlite3.Cursor, timeout_s: float) -> None:
    """Switch a SQLite file to write-ahead logging, waiting up to ``timeout_s`` for it.

    The switch needs the file's exclusive lock, and SQLite answers "database is
    locked" at once -- without calling the busy handler -- when another connection
    holds a lock in the old journal mode (e.g. two processes opening a new file
    together). So we retry, backing off, until the timeout a writer would wait.
    """
    deadline = time.monotonic() + timeout_s
    pause_s = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = str(exc) == "database is locked"  # SQLITE_BUSY (no error codes before 3.11)
            if not busy or time.monotonic() + pause_s > deadline:
                raise
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.1)


class JobStore:
    """Job rows in SQLite or PostgreSQL. Synchronous and thread-safe: call it from a
    thread pool. Every method is one short transaction.

    :param url: ``sqlite:///path/to/jobs.db`` (parent folders are created; WAL mode
        and a busy timeout let several processes share the file) or
        ``postgresql+psycopg://user:pass@host/db``. The table is created if missing.
    :param clock: returns the current aware UTC time (tests pass a fake one).
    :param busy_timeout_s: how long a SQLite writer waits for the file's write lock.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout_s: float = 30.0,
        echo: bool = False,
    ):
        self.url = url
        self._clock = clock or _utcnow
        self._engine = self._make_engine(url, busy_timeout_s, echo)
        self.dialect: str = self._engine.dialect.name
        self._create_schema()

    # -- engine and transactions ------------------------------------------------

    @staticmethod
    def _make_engine(url: str, busy_timeout_s: float, echo: bool) -> Engine:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True, echo=echo)

        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or "mode=memory" in database
        if not in_memory and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "connect_args": {"timeout": busy_timeout_s, "check_same_thread": False},
            "echo": echo,
        }
        if in_memory:
            kwargs["poolclass"] = StaticPool  # one shared connection, or each sees its own DB
        engine = create_engine(parsed, **kwargs)
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the sqlite3 module (which would start
            # transactions lazily, as deferred ones) so that we can BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
                if not in_memory:
                    _enable_wal(cur, busy_timeout_s)
                cur.execute("PRAGMA synchronous = FULL")  # a committed job survives power loss
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Writers take the write lock up front: a deferred transaction that
            # reads and then writes can fail with SQLITE_BUSY without waiting.
            write = conn.get_execution_options().get("strata_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(strata_write=True)
            with conn.begin():
                yield conn

    def _create_schema(self) -> None:
        with self._tx(write=True) as conn:
            if self.dialect == "postgresql":
                # Several replicas starting at once must not race on CREATE TABLE.
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            _metadata.create_all(conn, checkfirst=True)
            self._add_missing_columns(conn)

    @staticmethod
    def _add_missing_columns(conn: Connection) -> None:
        """Bring a table made by an older Strata up to this schema: columns added
        since (all nullable, e.g. ``owner``) are added empty, with their indexes, so
        existing stores keep working and keep their jobs."""
        present = {column["name"] for column in inspect(conn).get_columns(_t.name)}
        missing = [column for column in _t.columns if column.name not in present]
        if not missing:
            return
        for column in missing:
            if not column.nullable:
                raise RuntimeError(f"the job table lacks column {column.name!r}, which cannot be added empty")
            conn.execute(text(f"ALTER TABLE {_t.name} ADD COLUMN {CreateColumn(column).compile(dialect=conn.dialect)}"))
        for index in _t.indexes:
            index.create(conn, checkfirst=True)

    def close(self) -> None:
        """Close pooled connections (the store must not be used afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> datetime:
        """The store's current time (aware UTC): what it stamps on the jobs it changes."""
        return self._now()

    def _now(self, now: datetime | None = None) -> datetime:
        now = now if now is not None else self._clock()
        if now.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC")
        return now.astimezone(UTC)

    @staticmethod
    def _fetch(conn: Connection, job_id: str) -> Job | None:
        row = conn.execute(select(_t).where(_t.c.id == job_id)).mappings().first()
        return _row_to_job(row) if row is not None else None

    @staticmethod
    def _lapsed(now: datetime) -> Any:
        """Running, but nobody holds a live lease on it."""
        return and_(
            _t.c.status == JobStatus.RUNNING.value,
            or_(_t.c.lease_expires_at.is_(None), _t.c.lease_expires_at <= now),
        )

    # -- creating and reading ---------------------------------------------------

    def create(
        self,
        kind: str,
        params: Mapping[str, Any],
        *,
        max_queued: int | None = None,
        owner: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Insert a queued job and return it.

        :param max_queued: refuse with :class:`QueueFull` when this many jobs *of
            this kind* are already queued. The count and the insert are one
            serialised step: SQLite's write lock (``BEGIN IMMEDIATE``) on SQLite, a
            transaction-scoped advisory lock per kind (``pg_advisory_xact_lock``)
            on PostgreSQL, so concurrent creators -- on any number of nodes --
            never exceed the bound.
        :param owner: who created it (an API key id), for access control.
        :param job_id: an id from :func:`new_job_id`, for callers that write the
            input under the id before the row exists (so no dispatcher can see a
            row whose input is missing). Generated when omitted.
        """
        if max_queued is not None and max_queued < 0:
            raise ValueError("max_queued must be >= 0")
        now = self._now()
        job_id = job_id or new_job_id()
        with self._tx(write=True) as conn:
            if max_queued is not None:
                if self.dialect == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_queue_lock_key(kind))))
                queued = conn.scalar(
                    select(func.count())
                    .select_from(_t)
                    .where(_t.c.status == JobStatus.QUEUED.value, _t.c.kind == kind)
                )
                if queued >= max_queued:
                    raise QueueFull(queued, max_queued)
            conn.execute(
                insert(_t).values(
                    id=job_id,
                    kind=kind,
                    status=JobStatus.QUEUED.value,
                    progress=0.0,
                    created_at=now,
                    params=dict(params),
                    attempts=0,
                    cancel_requested=False,
                    owner=owner,
                )
            )
            job = self._fetch(conn, job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        """The job, or None when there is no such job."""
        with self._tx(write=False) as conn:
            return self._fetch(conn, job_id)

    def list(
        self,
        status: JobStatus | str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        owner: str | None = None,
        kind: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at
        the end). Cursors are opaque; a malformed one raises ValueError. Paging is
        keyset-based, so jobs created meanwhile neither repeat nor shift pages."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        query = select(_t)
        if status is not None:
            query = query.where(_t.c.status == JobStatus(status).value)
        if owner is not None:
            query = query.where(_t.c.owner == owner)
        if kind is not None:
            query = query.where(_t.c.kind == kind)
        if cursor is not None:
            query = query.where(_t.c.seq < _decode_cursor(cursor))
        query = query.order_by(_t.c.seq.desc()).limit(limit + 1)
        with self._tx(write=False) as conn:
            rows = conn.execute(query).mappings().all()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]["seq"]) if more else None
        return [_row_to_job(r) for r in rows], next_cursor

    def count(self, status: JobStatus | str | None = None, *, kind: str | None = None) -> int:
        """How many jobs have this status (all jobs when None)."""
        query = select(func.count()).select_from(_t)
        if status is not None:
            query = query.where(_t.c.status == JobStatus(status).value)
        if kind is not None:
            query = query.where(_t.c.kind == kind)
        with self._tx(write=False) as conn:
            return int(conn.scalar(query) or 0)

    def dispatchable(
        self, now: datetime | None = None, limit: int = 100, *, kind: str | None = None
    ) -> list[Job]:
        """Jobs that need a dispatcher, oldest first: queued ones, and running ones
        whose lease lapsed. Pass each to :meth:`claim`; a claim may still lose to
        another dispatcher, or end a lapsed job instead of running it (a cancel
        was requested, or ``max_attempts`` is spent)."""
        now = self._now(now)
        query = select(_t).where(or_(_t.c.status == JobStatus.QUEUED.value, self._lapsed(now)))
        if kind is not None:
            query = query.where(_t.c.kind == kind)
        query = query.order_by(_t.c.seq.asc()).limit(limit)
        with self._tx(write=False) as conn:
            return [_row_to_job(r) for r in conn.execute(query).mappings().all()]

    def expired(
        self, retention_s: float, now: datetime | None = None, *, limit: int = 1000
    ) -> list[str]:
        """Ids of finished jobs that finished more than ``retention_s`` ago, oldest
        first. Delete their files first, then the row (:meth:`delete`): a crash in
        between leaves a row that the next sweep finds again, never stray files."""
        cutoff = self._now(now) - timedelta(seconds=retention_s)
        query = (
            select(_t.c.id)
            .where(
                _t.c.status.in_([s.value for s in TERMINAL_STATUSES]),
                _t.c.finished_at <= cutoff,
            )
            .order_by(_t.c.finished_at.asc(), _t.c.seq.asc())
            .limit(limit)
        )
        with self._tx(write=False) as conn:
            return list(conn.scalars(query).all())

    # -- leases -------------------------------------------------------------------

    def claim(
        self,
        job_id: str,
        owner: str,
        lease_s: float,
        *,
        max_attempts: int | None = None,
    ) -> Job | None:
        """Take the job to run it: a queued job, or a running one whose lease
        lapsed, becomes running under ``owner`` until ``now + lease_s``. Returns the
        claimed job, or None when it is not claimable (someone holds it, it has
        finished, it does not exist).

        ``started_at`` is set on the first claim only; ``attempts`` counts claims;
        progress restarts at 0. A lapsed job whose cancel was requested ends
        ``cancelled`` instead, and with ``max_attempts`` a lapsed job that was
        claimed that many times ends ``failed`` (a job that kills its replica must
        not be retried for ever); both return None.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        now = self._now()
        lapsed = and_(_t.c.id == job_id, self._lapsed(now))
        with self._tx(write=True) as conn:
            conn.execute(
                update(_t)
                .where(lapsed, _t.c.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELLED.value, finished_at=now, lease_expires_at=None)
            )
            if max_attempts is not None:
                conn.execute(
                    update(_t)
                    .where(lapsed, _t.c.attempts >= max_attempts)
                    .values(
                        status=JobStatus.FAILED.value,
                        finished_at=now,
                        lease_expires_at=None,
                        error=f"gave up after {max_attempts} attempts (the worker was lost each time)",
                    )
                )
            claimed = conn.execute(
                update(_t)
                .where(
                    _t.c.id == job_id,
                    or_(_t.c.status == JobStatus.QUEUED.value, self._lapsed(now)),
                )
                .values(
                    status=JobStatus.RUNNING.value,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=_t.c.attempts + 1,
                    started_at=func.coalesce(_t.c.started_at, literal(now, _UTCDateTime())),
                    progress=0.0,
                    step=None,
                )
            )
            if claimed.rowcount != 1:
                return None
            return self._fetch(conn, job_id)

    def renew(
        self,
        job_id: str,
        owner: str,
        lease_s: float,
        *,
        progress: float | None = None,
        step: int | None = None,
        total_steps: int | None = None,
    ) -> Renewal:
        """Extend the lease to ``now + lease_s`` and record progress (each given
        value; progress is clamped to 0..1). Returns :class:`Renewal`: ``HELD``
        (truthy) to carry on, ``CANCEL_REQUESTED`` to stop and finish the job as
        cancelled, ``LOST`` to stop and write nothing. A lapsed lease that nobody
        has claimed since is still this owner's, and is renewed."""
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        now = self._now()
        values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_s)}
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, float(progress)))
        if step is not None:
            values["step"] = int(step)
        if total_steps is not None:
            values["total_steps"] = int(total_steps)
        with self._tx(write=True) as conn:
            renewed = conn.execute(
                update(_t)
                .where(*_held_by(job_id, owner))
                .values(**values)
            )
            if renewed.rowcount != 1:
                return Renewal.LOST
            cancel = conn.scalar(select(_t.c.cancel_requested).where(_t.c.id == job_id))
        return Renewal.CANCEL_REQUESTED if cancel else Renewal.HELD

    def release(self, job_id: str, owner: str) -> bool:
        """Give up a running job's lease now, as if it had lapsed: the job is
        dispatchable again at once (its worker was lost and will not finish it),
        and the next :meth:`claim` counts against ``max_attempts`` as usual. False
        when the job is not running under this owner any more."""
        now = self._now()
        with self._tx(write=True) as conn:
            released = conn.execute(
                update(_t)
                .where(*_held_by(job_id, owner))
                .values(lease_expires_at=now)
            )
            return released.rowcount == 1

    def finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus | str,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """End a running job held by ``owner`` with a terminal status. False when
        the job is not running under this owner any more (its lease was taken
        over, it was cancelled while unheld, or deleted): the caller's outcome is
        then discarded. A job that succeeds although a cancel was requested stays
        succeeded (the work is done; DELETE removes it).

        :param now: the finish time (default: the store's clock), for a caller that
            already wrote it into the job's results.
        """
        status = JobStatus(status)
        if not status.terminal:
            raise ValueError(f"finish needs a terminal status, not {status.value!r}")
        now = self._now(now)
        values: dict[str, Any] = {
            "status": status.value,
            "finished_at": now,
            "lease_expires_at": None,
            "result": dict(result) if result is not None else None,
            "error": error,
        }
        if status is JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        with self._tx(write=True) as conn:
            done = conn.execute(
                update(_t)
                .where(*_held_by(job_id, owner))
                .values(**values)
            )
            return done.rowcount == 1

    # -- cancelling and deleting ------------------------------------------------------

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job. A queued job -- or a running one whose lease lapsed, which
        nobody is working on -- is cancelled at once. A running job gets
        ``cancel_requested``; its dispatcher learns it from :meth:`renew` and
        finishes it as cancelled. A finished job is left as it is. Returns the job
        as it now stands, or None when there is no such job."""
        now = self._now()
        with self._tx(write=True) as conn:
            cancelled = conn.execute(
                update(_t)
                .where(
                    _t.c.id == job_id,
                    or_(_t.c.status == JobStatus.QUEUED.value, self._lapsed(now)),
                )
                .values(
                    status=JobStatus.CANCELLED.value,
                    cancel_requested=True,
                    finished_at=now,
                    lease_expires_at=None,
                )
            )
            if cancelled.rowcount == 0:
                conn.execute(
                    update(_t)
                    .where(_t.c.id == job_id, _t.c.status == JobStatus.RUNNING.value)
                    .values(cancel_requested=True)
                )
            return self._fetch(conn, job_id)

    def delete(self, job_id: str) -> bool:
        """Remove the row, whatever its state (the caller cancels running jobs and
        deletes files first). False when there was no such job."""
        with self._tx(write=True) as conn:
            return conn.execute(delete(_t).where(_t.c.id == job_id)).rowcount == 1
