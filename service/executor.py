"""Where jobs run: local worker processes, or Ray tasks on a cluster.

Either way the database decides who runs what: a worker (or Ray task) claims a queued job with a
compare-and-set update and then calls :func:`service.jobs.run_job`. The API process only keeps
the workers alive (local) or submits tasks for queued jobs (Ray), and recovers jobs whose worker
stopped beating.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from typing import Protocol

from service.settings import Settings
from service.store import Store

log = logging.getLogger("autoq.service.executor")


class Executor(Protocol):
    def start(self) -> None: ...
    def tick(self) -> None: ...
    def stop(self) -> None: ...
    def healthy(self) -> str | None: ...  # None when fine, else what is wrong


def make_executor(settings: Settings, store: Store) -> Executor:
    if settings.executor == "ray":
        return RayExecutor(settings, store)
    return LocalExecutor(settings, store)


def new_worker_id(kind: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{kind}:{uuid.uuid4().hex[:8]}"


def prepare_worker_process(settings: Settings) -> None:
    """Keep scratch files under the data dir and libraries offline; before torch is imported."""
    scratch = settings.tmp_dir / "worker"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(scratch)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.data_dir / "cache" / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "cache" / "inductor"))


# -- local worker processes ------------------------------------------------------------------


def worker_main(settings_data: dict, worker_id: str, torch_threads: int) -> None:
    """A worker process: claim queued jobs from the database and run them, one at a time."""
    settings = Settings(**settings_data)
    prepare_worker_process(settings)
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker {worker_id}: %(message)s")
    _exit_with_parent()

    import torch

    import autoq  # noqa: F401  (imported now, so the first job does not pay for it)
    from service import jobs

    torch.set_num_threads(torch_threads)
    store = Store(settings.database)
    while True:
        job = store.claim_next(worker_id)
        if job is None:
            time.sleep(settings.poll_seconds)
            continue
        log.info("claimed %s (attempt %d)", job.id, job.attempts)
        try:
            jobs.run_job(settings, store, job, worker_id)
        except Exception:  # e.g. the database went away mid-job: the lease re-queues the job
            log.exception("job %s: the worker could not finish its bookkeeping", job.id)
            time.sleep(settings.poll_seconds)


def _exit_with_parent() -> None:
    """Workers must not outlive the API process (e.g. after kill -9): their jobs are recovered."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class LocalExecutor:
    """``settings.workers`` processes (spawned: fork and torch do not mix), restarted if they die."""

    restart_delay = 5.0

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[tuple[multiprocessing.process.BaseProcess, str] | None] = (
            [None] * settings.workers)
        self._last_start = [0.0] * settings.workers
        self._threads = max(1, (os.cpu_count() or 1) // max(1, settings.workers))

    def start(self) -> None:
        for slot in range(len(self._slots)):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        worker_id = new_worker_id(f"w{slot}")
        process = self._context.Process(
            target=worker_main, args=(self.settings.for_workers(), worker_id, self._threads),
            name=f"autoq-worker-{slot}", daemon=True)
        process.start()
        self._slots[slot] = (process, worker_id)
        self._last_start[slot] = time.monotonic()

    def tick(self) -> None:
        for slot, entry in enumerate(self._slots):
            if entry is None or entry[0].is_alive():
                continue
            process, worker_id = entry
            log.warning("worker %s exited with code %s", worker_id, process.exitcode)
            # Its job (if any) is re-queued once its lease lapses, counted as a failed attempt.
            if time.monotonic() - self._last_start[slot] >= self.restart_delay:
                self._spawn(slot)

    def stop(self) -> None:
        entries = [entry for entry in self._slots if entry is not None]
        for process, _ in entries:
            process.terminate()
        for process, _ in entries:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        requeued = self.store.release_worker_jobs(
            [worker_id for _, worker_id in entries], "the server shut down")
        if requeued:
            log.info("re-queued %s after shutdown", ", ".join(requeued))
        self._slots = [None] * len(self._slots)

    def healthy(self) -> str | None:
        alive = sum(1 for entry in self._slots if entry is not None and entry[0].is_alive())
        if alive < len(self._slots):
            return f"{alive} of {len(self._slots)} workers alive"
        return None


# -- Ray -------------------------------------------------------------------------------------


def run_ray_job(settings_data: dict, job_id: str) -> str:
    """A Ray task: claim one job in the database and run it (same code as a local worker)."""
    settings = Settings(**settings_data)
    prepare_worker_process(settings)
    logging.basicConfig(level=settings.log_level.upper())
    from service import jobs

    store = Store(settings.database)
    worker_id = new_worker_id("ray")
    job = store.claim(job_id, worker_id)
    if job is None:  # cancelled meanwhile, or taken by another submitter
        return "skipped"
    return jobs.run_job(settings, store, job, worker_id)


class RayExecutor:
    """Submit one Ray task per queued job, at most ``settings.workers`` in flight.

    Each task reserves ``ray_num_gpus`` GPUs (default: 1 when the cluster has GPUs, else 0).
    Artifacts, uploads and the plan cache live under ``settings.shared`` (a shared filesystem on
    a multi-node cluster), and every node must reach the database.
    """

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._in_flight: dict[object, str] = {}  # ObjectRef -> job id
        self._task = None
        self._started_ray = False

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            address = self.settings.ray_address or os.environ.get("RAY_ADDRESS")
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started_ray = address is None
        gpus = self.settings.ray_num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        log.info("Ray executor: %s GPU(s) per job, up to %d at once", gpus,
                 self.settings.workers)
        self._task = ray.remote(num_gpus=gpus, max_retries=0)(run_ray_job)

    def tick(self) -> None:
        import ray

        if self._in_flight:
            done, _ = ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=0)
            for ref in done:
                job_id = self._in_flight.pop(ref)
                try:
                    log.info("Ray task for %s: %s", job_id, ray.get(ref))
                except Exception:  # the task died; the job's lease lapses and it is recovered
                    log.exception("Ray task for %s failed", job_id)
        free = self.settings.workers - len(self._in_flight)
        if free <= 0:
            return
        submitted = set(self._in_flight.values())
        for job_id in self.store.queued_job_ids(limit=free + len(submitted)):
            if job_id in submitted or free <= 0:
                continue
            ref = self._task.remote(self.settings.for_workers(), job_id)
            self._in_flight[ref] = job_id
            free -= 1

    def stop(self) -> None:
        import ray

        if self._started_ray:
            ray.shutdown()  # kills our local cluster's tasks; their jobs are recovered by lease

    def healthy(self) -> str | None:
        import ray

        return None if ray.is_initialized() else "Ray is not connected"
