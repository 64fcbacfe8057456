"""The job store under concurrency: reads never wait for the writer, list/get load only what
they show, state changes are compare-and-set, progress writes are throttled."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect as orm_state

from service.store import (
    CANCELLED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Conflict,
    QueueFull,
    QuotaExceeded,
    Store,
)

BIG_CALIBRATION = {"texts": ["a sentence of calibration text"] * 2000}
DATABASES = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server, where its binaries and psycopg are installed."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "nobody", "--"]
    # Not under pytest's temporary directory: the server's user must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="autoq-postgres-"))
    base.chmod(0o777)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "autoq", "--auth=trust"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {base}", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://autoq@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue("postgres")
    name = f"autoq_test_{next(DATABASES)}"
    admin = Store(f"{server}/postgres")
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.engine.dispose()
    return f"{server}/{name}"


@pytest.fixture
def store(url) -> Store:
    store = Store(url)
    store.create_all()
    yield store
    store.engine.dispose()


def new_job(store: Store, owner: str | None = None, **request) -> str:
    body = {"model": "bundled:minilm", "effective_bits": 6, "objective": "balanced", **request}
    job, _ = store.create_job(model="bundled:minilm", model_path="bundled:minilm", request=body,
                              request_hash="h", idempotency_key=None, owner=owner)
    return job.id


def test_reads_do_not_wait_for_a_writer(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_all()
    job_id = new_job(store)
    writer = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writer.execute("UPDATE jobs SET message = 'busy'")
    try:
        reader = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
        # With BEGIN IMMEDIATE for reads, each of these would wait for the writer (and fail).
        assert [job.id for job in reader.list_jobs(None, 10, None)] == [job_id]
        assert reader.get_job_view(job_id).status == QUEUED
        assert reader.job_status(job_id) == QUEUED
        assert reader.events_after(job_id, 0)[0].kind == "status"
        assert reader.counts_by_status()[QUEUED] == 1
        assert reader.get_job(job_id).request["effective_bits"] == 6
    finally:
        writer.execute("ROLLBACK")


def test_views_leave_the_request_and_plan_unloaded(store):
    job_id = new_job(store, calibration=BIG_CALIBRATION)
    for job in [store.get_job_view(job_id), *store.list_jobs(None, 10, None)]:
        assert {"request", "plan"} <= orm_state(job).unloaded
        assert job.summary["calibration_texts"] == 2000
        assert "calibration" not in job.summary
    assert store.get_job(job_id).request["calibration"] == BIG_CALIBRATION  # the worker's view


def test_jobs_from_before_the_summary_column(store, url):
    job_id = new_job(store, calibration={"texts": ["x", "y"]})
    with store.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE jobs DROP COLUMN summary")
    reopened = Store(url)
    reopened.create_all()  # adds the column back, empty for the old row
    assert reopened.get_job_view(job_id).summary["calibration_texts"] == 2
    assert reopened.get_job(job_id).summary is None  # the view did not write it back


def test_cancel_is_compare_and_set(store):
    job_id = new_job(store)
    results: list[object] = []

    def cancel() -> None:
        try:
            results.append(store.request_cancel(job_id).status)
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(CANCELLED) == 1 and results.count("conflict") == 7
    events = [e.data["status"] for e in store.events_after(job_id, 0)]
    assert events == [QUEUED, CANCELLED]

    running = new_job(store)
    assert store.claim(running, "w1") is not None
    assert store.request_cancel(running).cancel_requested
    assert store.request_cancel(running).status == RUNNING  # asked again: nothing new
    assert [e.data["message"] for e in store.events_after(running, 0)][-1] == "cancel requested"
    assert len(store.events_after(running, 0)) == 3
    assert store.request_cancel("job_" + "0" * 32) is None


def test_delete_is_compare_and_set(store):
    job_id = new_job(store)
    with pytest.raises(Conflict, match="queued"):
        store.delete_job(job_id)
    store.claim(job_id, "w1")
    with pytest.raises(Conflict, match="running"):
        store.delete_job(job_id)
    assert store.finish(job_id, "w1", SUCCEEDED, message="done", artifact_size=10)
    assert store.storage_used() == 10
    assert store.delete_job(job_id).id == job_id
    assert store.get_job(job_id) is None and store.events_after(job_id, 0) == []
    assert store.delete_job(job_id) is None


def test_claim_has_one_winner(store):
    job_id = new_job(store)
    winners: list[str] = []

    def claim(worker: str) -> None:
        if store.claim(job_id, worker) is not None:
            winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and store.get_job(job_id).worker_id == winners[0]


def test_queue_limit(store):
    store.max_queued = 2
    first = new_job(store)
    new_job(store)
    with pytest.raises(QueueFull, match="limit is 2"):
        new_job(store)
    store.request_cancel(first)
    new_job(store)  # room again


def test_quota_per_owner_counts_queued_and_running(store):
    store.max_per_owner = 2
    first, second = new_job(store, owner="token:a"), new_job(store, owner="token:a")
    store.claim(first, "w1")  # running counts as much as queued
    with pytest.raises(QuotaExceeded, match="at most 2") as refused:
        new_job(store, owner="token:a")
    assert (refused.value.active, refused.value.limit) == (2, 2)
    new_job(store, owner="token:b")  # another client has its own quota
    new_job(store)  # so do jobs without an owner (none counted)
    store.request_cancel(second)  # a finished job no longer counts
    new_job(store, owner="token:a")
    with pytest.raises(QuotaExceeded):
        new_job(store, owner="token:a")


def test_quota_holds_under_concurrent_submissions(store):
    store.max_per_owner = 3
    created, refused = [], []

    def submit() -> None:
        try:
            created.append(new_job(store, owner="token:a"))
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(created), len(refused)) == (3, 5)


def test_jobs_from_before_the_owner_column(store, url):
    job_id = new_job(store)
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_jobs_owner")
        connection.exec_driver_sql("ALTER TABLE jobs DROP COLUMN owner")
    reopened = Store(url, max_per_owner=1)
    reopened.create_all()  # adds the column (and its index) back, empty for the old row
    assert reopened.get_job_view(job_id).status == QUEUED
    new_job(reopened, owner="token:a")
    with pytest.raises(QuotaExceeded):
        new_job(reopened, owner="token:a")


def test_progress_writes_are_throttled(store):
    job_id = new_job(store)
    store.claim(job_id, "w1")
    before = len(store.events_after(job_id, 0))
    assert store.report(job_id, "w1", "stage", stage="profile", progress=0.1, message=None)
    for step in range(50):
        assert store.report(job_id, "w1", "progress", stage="profile", progress=0.1 + step / 1000,
                            message=None)
    kinds = [e.kind for e in store.events_after(job_id, before)]
    assert kinds == ["stage", "progress"]  # 50 calls within a moment: one progress event
    assert store.report(job_id, "w1", "stage", stage="benchmark", progress=0.3, message=None)
    assert store.report(job_id, "w1", "progress", stage="benchmark", progress=0.31, message=None)
    assert [e.kind for e in store.events_after(job_id, before)][-2:] == ["stage", "progress"]
    assert not store.report(job_id, "someone-else", "stage", stage="x", progress=0.5, message=None)


def test_many_readers_beside_a_busy_writer(store):
    """Readers on threads while a writer keeps the database busy: no read fails."""
    job_id = new_job(store)
    store.claim(job_id, "w1")
    stop = time.monotonic() + 2.0
    failures: list[BaseException] = []

    def write() -> None:
        step = 0
        while time.monotonic() < stop:
            step += 1
            store.report(job_id, "w1", "stage", stage=f"s{step % 5}", progress=0.5, message=None)

    def read() -> None:
        try:
            while time.monotonic() < stop:
                store.list_jobs(None, 20, None)
                store.get_job_view(job_id)
                store.events_after(job_id, 0, 50)
        except BaseException as e:  # noqa: BLE001 - any failure is the finding
            failures.append(e)

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(4))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]


def test_retention(store, tmp_path):
    from service.app import apply_retention
    from service.jobs import artifact_dir
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    ids = [new_job(store) for _ in range(3)]
    for job_id in ids:
        store.claim(job_id, "w1")
        artifact_dir(settings, job_id).mkdir(parents=True)
        (artifact_dir(settings, job_id) / "checkpoint.tar").write_bytes(b"x")
        store.finish(job_id, "w1", SUCCEEDED, message="done", artifact_etag="e", artifact_size=1)
    running = new_job(store)
    store.claim(running, "w1")
    now = time.time()

    apply_retention(settings, store, now + 1000)  # nothing configured: everything kept
    assert all(store.get_job(job_id).artifact_etag == "e" for job_id in ids)

    artifacts = settings.model_copy(update={"artifact_retention_seconds": 500})
    apply_retention(artifacts, store, now + 1000)
    assert all(store.get_job(job_id).artifact_etag is None for job_id in ids)
    assert not any(artifact_dir(settings, job_id).exists() for job_id in ids)
    assert store.storage_used() == 0

    events = settings.model_copy(update={"event_retention_seconds": 500})
    apply_retention(events, store, now + 1000)
    assert store.events_after(ids[0], 0) == [] and store.events_after(running, 0)

    jobs = settings.model_copy(update={"job_retention_seconds": 500})
    apply_retention(jobs, store, now + 100)  # not old enough yet
    assert store.get_job(ids[0]) is not None
    apply_retention(jobs, store, now + 1000)
    assert [store.get_job(job_id) for job_id in ids] == [None, None, None]
    assert store.get_job(running).status == RUNNING  # never a job that has not finished


def test_ping_does_not_wait_for_a_writer(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_all()
    writer = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        store.ping()  # /readyz stays ready while a job writes
    finally:
        writer.execute("ROLLBACK")
