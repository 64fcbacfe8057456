"""Cancel reaches a job within about a second even when it is inside one long step: the
heartbeat thread marks it cancelled and stops the worker process (unit tests, no server)."""

from __future__ import annotations

import threading
import time

from service import jobs
from service.settings import Settings
from service.store import CANCELLED, Heartbeat


class FakeStore:
    def __init__(self):
        self.cancel_requested = False
        self.finished: list[tuple[str, str]] = []

    def heartbeat(self, job_id, worker_id):
        return Heartbeat(owned=True, cancel_requested=self.cancel_requested)

    def finish(self, job_id, worker_id, status, **fields):
        self.finished.append((job_id, status))
        return True


def test_a_cancel_not_acted_on_stops_the_job_within_the_grace_period():
    store, stuck = FakeStore(), threading.Event()
    with jobs.JobMonitor(store, "j1", "w1", interval=0.05, on_stuck=stuck.set) as monitor:
        time.sleep(0.2)
        assert not stuck.is_set()
        requested = time.monotonic()
        store.cancel_requested = True
        assert stuck.wait(timeout=5)  # the job's thread never looked: it is stopped
        latency = time.monotonic() - requested
        assert monitor.cancelled.is_set()
    assert jobs.CANCEL_GRACE_SECONDS <= latency < jobs.CANCEL_GRACE_SECONDS + 2.0


def test_a_cancel_acted_on_in_time_does_not_stop_the_worker():
    store, stuck = FakeStore(), threading.Event()
    with jobs.JobMonitor(store, "j1", "w1", interval=0.05, on_stuck=stuck.set) as monitor:
        store.cancel_requested = True
        while not monitor.cancelled.is_set():
            time.sleep(0.01)
        try:
            monitor.check()  # what every progress callback does
        except jobs.Interrupted as err:
            assert err.reason == "cancelled"
        time.sleep(jobs.CANCEL_GRACE_SECONDS + 0.5)
    assert not stuck.is_set()


def test_stopping_a_cancelled_job_marks_it_and_removes_its_files(tmp_path):
    settings = Settings(data_dir=tmp_path)
    partial = settings.artifacts_dir / ".tmp-j1-abcd"
    partial.mkdir(parents=True)
    store, exits = FakeStore(), []
    jobs.stop_cancelled_job(settings, store, "j1", "w1", exit_process=exits.append)
    assert store.finished == [("j1", CANCELLED)] and exits == [4]
    assert not partial.exists()
