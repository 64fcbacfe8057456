"""The database: jobs, their events and stage timings, and uploaded models (SQLAlchemy 2).

The database is the only source of truth. Every state change is a compare-and-set ``UPDATE``
(``WHERE status = ...``, ``WHERE worker_id = ...``), so API processes, local workers and Ray tasks
can share one database without stepping on each other. A worker owns a running job while it keeps
``heartbeat_at`` fresh; a job whose heartbeat is older than the lease is recovered by whichever
process runs :meth:`Store.recover_expired` first.

Reads never take SQLite's write lock (a plain deferred ``BEGIN``; in WAL mode readers and the
one writer do not block each other), and the API's list and get read only the columns they
return: a job's request (calibration texts: up to tens of MB) and plan are loaded only by the
worker and the plan endpoint. Progress writes are throttled per job.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, mapped_column, sessionmaker

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(Text)  # as the client named it
    model_path: Mapped[str] = mapped_column(Text)  # the directory it resolved to
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    # Who submitted it (a digest of the bearer token, or the address without tokens): the
    # per-client quota counts queued + running jobs by this. Null for jobs written before.
    owner: Mapped[str | None] = mapped_column(String(80), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    plan_cache_hit: Mapped[bool | None] = mapped_column(Boolean)
    plan_key: Mapped[str | None] = mapped_column(String(200))
    plan_effective_bits: Mapped[float | None] = mapped_column(Float)
    artifact_etag: Mapped[str | None] = mapped_column(String(80))
    artifact_size: Mapped[int | None] = mapped_column(Integer)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # The request without its calibration texts (their count instead): what a job view shows.
    # Null for jobs written before the column existed.
    summary: Mapped[dict | None] = mapped_column(JSON)
    # Last, so that SQLite reads the columns above without walking these (large) values.
    request: Mapped[dict] = mapped_column(JSON)
    plan: Mapped[dict | None] = mapped_column(JSON)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class EventRow(Base):
    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class StageRow(Base):
    __tablename__ = "job_stages"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    __tablename__ = "models"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    files: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Conflict(Exception):
    """The request clashes with the job's (or model's) current state."""


class QueueFull(Exception):
    """Too many jobs are waiting already (a 429 for the client)."""


class QuotaExceeded(Exception):
    """This client has as many jobs queued or running as it may (a 429 for the client)."""

    def __init__(self, active: int, limit: int):
        super().__init__(
            f"this client (bearer token, or address when the server has no tokens) has {active} "
            f"jobs queued or running, and may have at most {limit} at once "
            f"(AUTOQ_MAX_JOBS_PER_TOKEN={limit}); wait for one to finish (GET "
            f"/v1/jobs?status=running, GET /v1/jobs?status=queued) or cancel one (POST "
            f"/v1/jobs/{{job_id}}/cancel), then retry")
        self.active, self.limit = active, limit


# Columns a job view needs; list, get and SSE load only these.
VIEW_OPTIONS = (defer(JobRow.request), defer(JobRow.plan), defer(JobRow.owner))
# Progress events of one job are written at most this often (stage and status changes always).
PROGRESS_INTERVAL = 0.5


def request_summary(request: dict) -> dict:
    calibration = request.get("calibration")
    summary = {key: value for key, value in request.items() if key != "calibration"}
    summary["calibration_texts"] = len(calibration["texts"]) if calibration else None
    return summary


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # As many connections as the API's worker threads may want at once (SQLite's are cheap).
    engine = create_engine(url, connect_args={"timeout": 30}, pool_size=10, max_overflow=30)

    # Several processes write one SQLite file: WAL lets readers run beside the writer. A
    # writing transaction starts with BEGIN IMMEDIATE, taking the write lock up front so it
    # never fails half-way when it upgrades from reading to writing; a read-only one (the
    # ``autoq_read`` execution option) starts with a plain BEGIN and never waits for writers.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get("autoq_read", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@dataclass
class Heartbeat:
    owned: bool
    cancel_requested: bool


class Store:
    def __init__(self, url: str, max_queued: int | None = None,
                 max_per_owner: int | None = None):
        self.engine = make_engine(url)
        self.max_queued = max_queued
        self.max_per_owner = max_per_owner
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(autoq_read=True),
                                           expire_on_commit=False)
        self._progress_written: dict[str, float] = {}

    def create_all(self) -> None:
        Base.metadata.create_all(self.engine)
        # Columns added since the first release (create_all adds tables, not columns).
        columns = {column["name"] for column in inspect(self.engine).get_columns("jobs")}
        if "summary" not in columns:
            with self.engine.begin() as connection:
                connection.exec_driver_sql("ALTER TABLE jobs ADD COLUMN summary JSON")
        if "owner" not in columns:
            with self.engine.begin() as connection:
                connection.exec_driver_sql("ALTER TABLE jobs ADD COLUMN owner VARCHAR(80)")
                connection.exec_driver_sql(
                    "CREATE INDEX IF NOT EXISTS ix_jobs_owner ON jobs (owner)")

    def ping(self) -> None:
        with self.engine.execution_options(autoq_read=True).connect() as connection:
            connection.execute(text("SELECT 1"))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A writing transaction (on SQLite: BEGIN IMMEDIATE, the database's one writer)."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: never takes, nor waits for, SQLite's write lock."""
        with self._read_sessions.begin() as session:
            yield session

    # -- jobs: creation and reading ----------------------------------------------------------

    def create_job(self, *, model: str, model_path: str, request: dict, request_hash: str,
                   idempotency_key: str | None, owner: str | None = None) -> tuple[JobRow, bool]:
        """``(job, created)``; an existing job when the idempotency key was seen with this body.

        Raises :class:`Conflict` when the key was used with another body, :class:`QueueFull`
        when ``max_queued`` jobs wait already, :class:`QuotaExceeded` when ``owner`` has
        ``max_per_owner`` jobs queued or running (a replayed idempotent request counts no job).
        """
        if idempotency_key is not None:
            existing = self._job_for_key(idempotency_key, request_hash)
            if existing is not None:
                return existing, False
        now = time.time()
        job = JobRow(id=new_id("job"), status=QUEUED, model=model, model_path=model_path,
                     request=request, summary=request_summary(request),
                     request_hash=request_hash, idempotency_key=idempotency_key,
                     owner=owner, progress=0.0, attempts=0, cancel_requested=False, created_at=now,
                     updated_at=now, event_seq=0)
        try:
            with self.transaction() as session:
                if self.max_queued is not None:
                    queued = session.scalar(select(func.count()).where(JobRow.status == QUEUED))
                    if (queued or 0) >= self.max_queued:
                        raise QueueFull(f"{queued} jobs are waiting already (the limit is "
                                        f"{self.max_queued}); retry later")
                if owner is not None and self.max_per_owner is not None:
                    self._check_quota(session, owner, self.max_per_owner)
                session.add(job)
                session.flush()
                _append_event(session, job.id, "status", {"status": QUEUED, "message": "queued"})
        except IntegrityError:
            if idempotency_key is None:
                raise
            # Another request with the same key won the race.
            existing = self._job_for_key(idempotency_key, request_hash)
            if existing is None:
                raise
            return existing, False
        return self.get_job_view(job.id), True  # type: ignore[return-value]

    @staticmethod
    def _check_quota(session: Session, owner: str, limit: int) -> None:
        """Raise :class:`QuotaExceeded` when ``owner`` has ``limit`` jobs queued or running.

        Inside the creating transaction: on SQLite that holds the database's one write lock, so
        two requests cannot both pass the count; on PostgreSQL a transaction-scoped advisory lock
        per owner serialises them the same way.
        """
        if session.get_bind().dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:8], "big", signed=True)
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        active = session.scalar(select(func.count()).where(
            JobRow.owner == owner, JobRow.status.in_([QUEUED, RUNNING]))) or 0
        if active >= limit:
            raise QuotaExceeded(active, limit)

    def _job_for_key(self, key: str, request_hash: str) -> JobRow | None:
        with self.reading() as session:
            job = session.scalar(select(JobRow).options(*VIEW_OPTIONS)
                                 .where(JobRow.idempotency_key == key))
        if job is not None and job.request_hash != request_hash:
            raise Conflict(
                "this Idempotency-Key was already used with a different request body; "
                "use a new key for a new job"
            )
        return job

    def get_job(self, job_id: str) -> JobRow | None:
        """The whole job, its request (calibration texts) and plan included."""
        with self.reading() as session:
            return session.scalar(select(JobRow).where(JobRow.id == job_id))

    def get_job_view(self, job_id: str) -> JobRow | None:
        """The job without its request and plan (use :func:`job_summary` for the request)."""
        with self.reading() as session:
            return self._with_summary(session, session.scalar(
                select(JobRow).options(*VIEW_OPTIONS).where(JobRow.id == job_id)))

    def get_plan(self, job_id: str) -> tuple[str, dict | None] | None:
        """``(status, plan)`` of a job; None when there is no such job."""
        with self.reading() as session:
            row = session.execute(select(JobRow.status, JobRow.plan)
                                  .where(JobRow.id == job_id)).first()
        return (row[0], row[1]) if row is not None else None

    def job_status(self, job_id: str) -> str | None:
        with self.reading() as session:
            return session.scalar(select(JobRow.status).where(JobRow.id == job_id))

    @staticmethod
    def _with_summary(session: Session, job: JobRow | None) -> JobRow | None:
        if job is not None and job.summary is None:  # written before summaries existed
            session.expunge(job)  # a view, never written back
            request = session.scalar(select(JobRow.request).where(JobRow.id == job.id))
            job.summary = request_summary(request or {})
        return job

    def list_jobs(self, status: str | None, limit: int, before: int | None) -> list[JobRow]:
        """Newest first; ``before`` is the ``seq`` of the last job of the previous page.

        Jobs come without their request and plan, as :meth:`get_job_view` gives them.
        """
        query = select(JobRow).options(*VIEW_OPTIONS).order_by(JobRow.seq.desc()).limit(limit)
        if status is not None:
            query = query.where(JobRow.status == status)
        if before is not None:
            query = query.where(JobRow.seq < before)
        with self.reading() as session:
            return [self._with_summary(session, job)  # type: ignore[misc]
                    for job in session.scalars(query)]

    def stage_timings(self, job_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        timings: dict[str, dict[str, float]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return timings
        query = (select(StageRow).where(StageRow.job_id.in_(list(job_ids)))
                 .order_by(StageRow.job_id, StageRow.ordinal))
        with self.reading() as session:
            for row in session.scalars(query):
                timings[row.job_id][row.stage] = row.seconds
        return timings

    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[EventRow]:
        query = (select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > after)
                 .order_by(EventRow.seq).limit(limit))
        with self.reading() as session:
            return list(session.scalars(query))

    def queued_job_ids(self, limit: int) -> list[str]:
        query = (select(JobRow.id).where(JobRow.status == QUEUED).order_by(JobRow.seq)
                 .limit(limit))
        with self.reading() as session:
            return list(session.scalars(query))

    def counts_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        query = select(JobRow.status, func.count()).group_by(JobRow.status)
        with self.reading() as session:
            for status, count in session.execute(query):
                counts[status] = count
        return counts

    def stage_totals(self) -> dict[str, tuple[int, float]]:
        """``{stage: (jobs, total seconds)}`` over every recorded stage."""
        query = select(StageRow.stage, func.count(), func.sum(StageRow.seconds)).group_by(
            StageRow.stage)
        with self.reading() as session:
            return {stage: (count, float(total or 0.0))
                    for stage, count, total in session.execute(query)}

    # -- jobs: client actions ----------------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Cancel a queued job at once; ask a running one to stop at its next step.

        Each change is a compare-and-set ``UPDATE`` (``WHERE status = ...``), so it is safe on
        any backend however the API processes and workers interleave.
        """
        for _ in range(3):  # a queued job may start between the two attempts: look again
            now = time.time()
            with self.transaction() as session:
                if session.execute(
                    update(JobRow).where(JobRow.id == job_id, JobRow.status == QUEUED)
                    .values(status=CANCELLED, finished_at=now, updated_at=now,
                            message="cancelled before it started")
                ).rowcount:
                    _append_event(session, job_id, "status",
                                  {"status": CANCELLED, "message": "cancelled before it started"})
                    break
                if session.execute(
                    update(JobRow).where(JobRow.id == job_id, JobRow.status == RUNNING,
                                         JobRow.cancel_requested.is_(False))
                    .values(cancel_requested=True, updated_at=now)
                ).rowcount:
                    _append_event(session, job_id, "status",
                                  {"status": RUNNING, "message": "cancel requested"})
                    break
            status = self.job_status(job_id)
            if status is None:
                return None
            if status in FINISHED:
                raise Conflict(f"job {job_id} already {status}; there is nothing to cancel")
            if status == RUNNING:  # its cancel was requested before
                break
        return self.get_job_view(job_id)

    def delete_job(self, job_id: str) -> JobRow | None:
        """Delete a finished job with its events and timings (compare-and-set on its status)."""
        finished = JobRow.status.in_(list(FINISHED))
        with self.transaction() as session:
            # Locks the row (PostgreSQL) only if it is finished, so it stays finished.
            if session.execute(update(JobRow).where(JobRow.id == job_id, finished)
                               .values(updated_at=time.time())).rowcount:
                session.execute(delete(EventRow).where(EventRow.job_id == job_id))
                session.execute(delete(StageRow).where(StageRow.job_id == job_id))
                job = session.scalar(select(JobRow).options(*VIEW_OPTIONS)
                                     .where(JobRow.id == job_id))
                session.execute(delete(JobRow).where(JobRow.id == job_id, finished))
                return job
        status = self.job_status(job_id)
        if status is None:
            return None
        raise Conflict(f"job {job_id} is {status}; cancel it before deleting it")

    # -- retention ---------------------------------------------------------------------------

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Ids of jobs that finished before ``cutoff`` (oldest first)."""
        query = (select(JobRow.id).where(JobRow.status.in_(list(FINISHED)),
                                         JobRow.finished_at < cutoff)
                 .order_by(JobRow.finished_at).limit(limit))
        with self.reading() as session:
            return list(session.scalars(query))

    def drop_events(self, cutoff: float) -> int:
        """Delete the events of jobs that finished before ``cutoff``; how many were deleted."""
        finished = (select(JobRow.id).where(JobRow.status.in_(list(FINISHED)),
                                            JobRow.finished_at < cutoff))
        with self.transaction() as session:
            return session.execute(delete(EventRow).where(EventRow.job_id.in_(finished))).rowcount

    def drop_artifacts(self, cutoff: float, limit: int = 100) -> list[str]:
        """Forget the checkpoints of jobs that finished before ``cutoff``; their ids (the
        caller removes the files: the API stops offering them first)."""
        query = (select(JobRow.id).where(JobRow.status.in_(list(FINISHED)),
                                         JobRow.finished_at < cutoff,
                                         JobRow.artifact_etag.is_not(None)).limit(limit))
        with self.transaction() as session:
            ids = list(session.scalars(query))
            if ids:
                session.execute(update(JobRow).where(JobRow.id.in_(ids))
                                .values(artifact_etag=None, artifact_size=None))
        return ids

    def storage_used(self) -> int:
        """Bytes of uploaded models and job checkpoints, as recorded."""
        with self.reading() as session:
            models = session.scalar(select(func.coalesce(func.sum(ModelRow.size_bytes), 0)))
            artifacts = session.scalar(select(func.coalesce(func.sum(JobRow.artifact_size), 0)))
        return int(models or 0) + int(artifacts or 0)

    # -- jobs: worker side -------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str) -> JobRow | None:
        """Take a queued job for ``worker_id``; ``None`` when someone else got it first."""
        now = time.time()
        with self.transaction() as session:
            claimed = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == QUEUED)
                .values(status=RUNNING, worker_id=worker_id, heartbeat_at=now, started_at=now,
                        updated_at=now, attempts=JobRow.attempts + 1, stage=None, progress=0.0,
                        message=None, error=None)
            ).rowcount
            if not claimed:
                return None
            session.execute(delete(StageRow).where(StageRow.job_id == job_id))
            _append_event(session, job_id, "status", {"status": RUNNING, "message": "started"})
        return self.get_job(job_id)

    def claim_next(self, worker_id: str) -> JobRow | None:
        for job_id in self.queued_job_ids(limit=8):
            job = self.claim(job_id, worker_id)
            if job is not None:
                return job
        return None

    def heartbeat(self, job_id: str, worker_id: str) -> Heartbeat:
        with self.transaction() as session:
            owned = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker_id == worker_id,
                       JobRow.status == RUNNING)
                .values(heartbeat_at=time.time())
            ).rowcount
            cancel = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
        return Heartbeat(owned=bool(owned), cancel_requested=bool(cancel))

    def report(self, job_id: str, worker_id: str, kind: str, *, stage: str | None,
               progress: float, message: str | None) -> bool:
        """Record a stage or progress change of a job this worker owns; False if it does not.

        Progress events closer than ``PROGRESS_INTERVAL`` to the job's last one are dropped
        (answered True: the heartbeat notices a lost job); stage and status changes never are.
        """
        now = time.time()
        if kind == "progress":
            if now - self._progress_written.get(job_id, 0.0) < PROGRESS_INTERVAL:
                return True
            self._progress_written[job_id] = now
        else:
            self._progress_written.pop(job_id, None)
        with self.transaction() as session:
            owned = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker_id == worker_id,
                       JobRow.status == RUNNING)
                .values(stage=stage, progress=progress, message=message, updated_at=now,
                        heartbeat_at=now)
            ).rowcount
            if owned:
                _append_event(session, job_id, kind, {"status": RUNNING, "stage": stage,
                                                      "progress": progress, "message": message})
        return bool(owned)

    def record_stage_time(self, job_id: str, stage: str, seconds: float) -> None:
        with self.transaction() as session:
            row = session.get(StageRow, (job_id, stage))
            if row is None:
                ordinal = session.scalar(select(func.count()).where(StageRow.job_id == job_id))
                session.add(StageRow(job_id=job_id, stage=stage, ordinal=ordinal or 0,
                                     seconds=seconds))
            else:
                row.seconds += seconds

    def finish(self, job_id: str, worker_id: str, status: str, *, message: str,
               error: str | None = None, **fields: Any) -> bool:
        """Move an owned running job to a final status; False if this worker lost it."""
        now = time.time()
        self._progress_written.pop(job_id, None)
        progress = {"progress": 1.0} if status == SUCCEEDED else {}
        with self.transaction() as session:
            owned = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker_id == worker_id,
                       JobRow.status == RUNNING)
                .values(status=status, message=message, error=error, finished_at=now,
                        updated_at=now, heartbeat_at=None, **progress, **fields)
            ).rowcount
            if owned:
                data = {"status": status, "message": message, **progress}
                if error:
                    data["error"] = error
                _append_event(session, job_id, "status", data)
        return bool(owned)

    # -- recovery ----------------------------------------------------------------------------

    def recover_expired(self, lease_seconds: float, retry_limit: int) -> list[str]:
        """Re-queue (or fail, past the retry limit) running jobs whose worker stopped beating."""
        cutoff = time.time() - lease_seconds
        query = select(JobRow).options(*VIEW_OPTIONS).where(JobRow.status == RUNNING,
                                                            JobRow.heartbeat_at < cutoff)
        with self.reading() as session:
            expired = list(session.scalars(query))
        recovered = []
        for job in expired:
            reason = (f"worker {job.worker_id} stopped responding (no heartbeat for "
                      f"{lease_seconds:g} s) during attempt {job.attempts}")
            if self._release(job, reason, retry_limit, only_if_heartbeat_before=cutoff):
                recovered.append(job.id)
        return recovered

    def release_worker_jobs(self, worker_ids: Sequence[str], reason: str) -> list[str]:
        """Re-queue the jobs of workers this process stopped on purpose (not counted as a try)."""
        if not worker_ids:
            return []
        query = select(JobRow).options(*VIEW_OPTIONS).where(
            JobRow.status == RUNNING, JobRow.worker_id.in_(list(worker_ids)))
        with self.reading() as session:
            jobs = list(session.scalars(query))
        return [job.id for job in jobs if self._release(job, reason, None)]

    def _release(self, job: JobRow, reason: str, retry_limit: int | None,
                 only_if_heartbeat_before: float | None = None) -> bool:
        now = time.time()
        conditions = [JobRow.id == job.id, JobRow.status == RUNNING,
                      JobRow.worker_id == job.worker_id]
        if only_if_heartbeat_before is not None:
            conditions.append(JobRow.heartbeat_at < only_if_heartbeat_before)
        if job.cancel_requested:
            status, message, error = CANCELLED, f"cancelled ({reason})", None
        elif retry_limit is not None and job.attempts > retry_limit:
            status, message = FAILED, "failed: its worker was lost too many times"
            error = f"{reason}; giving up after {job.attempts} attempts (retry limit {retry_limit})"
        else:
            status, message, error = QUEUED, f"re-queued: {reason}", None
        values: dict[str, Any] = {"status": status, "message": message, "error": error,
                                  "worker_id": None, "heartbeat_at": None, "updated_at": now}
        if status == QUEUED:
            values.update(stage=None, progress=0.0)
            if retry_limit is None:  # stopped on purpose: this try does not count
                values["attempts"] = JobRow.attempts - 1
        else:
            values["finished_at"] = now
        with self.transaction() as session:
            if not session.execute(update(JobRow).where(*conditions).values(**values)).rowcount:
                return False
            data = {"status": status, "message": message}
            if error:
                data["error"] = error
            _append_event(session, job.id, "status", data)
        return True

    # -- uploaded models ---------------------------------------------------------------------

    def add_model(self, model: ModelRow) -> ModelRow:
        with self.transaction() as session:
            session.add(model)
        return model

    def get_model(self, model_id: str) -> ModelRow | None:
        with self.reading() as session:
            return session.scalar(select(ModelRow).where(ModelRow.id == model_id))

    def list_models(self, limit: int, before: int | None) -> list[ModelRow]:
        query = select(ModelRow).order_by(ModelRow.seq.desc()).limit(limit)
        if before is not None:
            query = query.where(ModelRow.seq < before)
        with self.reading() as session:
            return list(session.scalars(query))

    def delete_model(self, model_id: str) -> ModelRow | None:
        with self.transaction() as session:
            model = session.scalar(select(ModelRow).where(ModelRow.id == model_id))
            if model is None:
                return None
            active = session.scalar(select(func.count()).where(
                JobRow.model == model_id, JobRow.status.in_([QUEUED, RUNNING])))
            if active:
                raise Conflict(f"model {model_id} is used by {active} queued or running job(s)")
            session.delete(model)
        return model


def _append_event(session: Session, job_id: str, kind: str, data: dict) -> None:
    # Bumping the job's counter locks its row, so events of one job get gap-free, ordered
    # numbers even when the API and a worker write at the same time.
    seq = session.execute(
        update(JobRow).where(JobRow.id == job_id).values(event_seq=JobRow.event_seq + 1)
        .returning(JobRow.event_seq)
    ).scalar_one()
    session.add(EventRow(job_id=job_id, seq=seq, kind=kind, data=data, created_at=time.time()))
