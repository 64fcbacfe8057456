"""Run one job: the library's pipeline, plus the bookkeeping that makes it a service job.

``run_job`` is the same for every executor (a local worker process or a Ray task): the worker has
already claimed the job in the database; this function keeps the claim alive (heartbeat), records
stage and progress events, stops between steps when a cancel is requested, and writes the
checkpoint atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

from autoq.stages import Stage
from service.schemas import JobCreate
from service.settings import Settings
from service.store import CANCELLED, FAILED, SUCCEEDED, JobRow, Store

log = logging.getLogger("autoq.service.jobs")

ARTIFACT_FILE = "checkpoint.tar"
PLAN_FILE = "plan.json"
# Rough share of a job's time per stage, for the overall progress figure.
STAGE_WEIGHTS = {
    Stage.LOAD: 0.04, Stage.CALIBRATION: 0.01, Stage.PROFILE: 0.15, Stage.BENCHMARK: 0.30,
    Stage.SENSITIVITY: 0.30, Stage.SOLVE: 0.04, Stage.REFINE: 0.06, Stage.APPLY: 0.03,
    Stage.EXPORT: 0.07,
}
STAGE_START = dict(zip(STAGE_WEIGHTS, accumulate([0.0, *STAGE_WEIGHTS.values()]), strict=False))


class Interrupted(Exception):
    """The job must stop: it was cancelled, or another worker now owns it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# A cancel the job's own thread has not acted on this long after it was seen (a long tensor
# operation between two progress callbacks) stops the worker process instead.
CANCEL_GRACE_SECONDS = 0.8


class JobMonitor:
    """Keeps the job's lease fresh and notices cancel requests, on a background thread.

    The thread runs while the main thread is busy in long tensor operations, so the lease does
    not lapse between progress callbacks. When a cancel is not acted on within
    ``CANCEL_GRACE_SECONDS`` (no progress callback came), ``on_stuck`` is called from this thread:
    the worker marks the job cancelled and ends its own process (see :func:`run_job`).
    """

    def __init__(self, store: Store, job_id: str, worker_id: str, interval: float,
                 on_stuck: Callable[[], None] | None = None):
        self.store, self.job_id, self.worker_id, self.interval = store, job_id, worker_id, interval
        self.on_stuck = on_stuck
        self.cancelled = threading.Event()
        self.acknowledged = threading.Event()  # the job's thread raised Interrupted("cancelled")
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._cancel_seen = 0.0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval if not self.cancelled.is_set() else 0.1):
            if self.cancelled.is_set():
                self._enforce_cancel()
                continue
            try:
                beat = self.store.heartbeat(self.job_id, self.worker_id)
            except Exception:  # a database hiccup: try again next beat
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)
                continue
            if not beat.owned:
                self.lost.set()
            if beat.cancel_requested:
                self._cancel_seen = time.monotonic()
                self.cancelled.set()

    def _enforce_cancel(self) -> None:
        stuck = time.monotonic() - self._cancel_seen > CANCEL_GRACE_SECONDS
        if stuck and not self.acknowledged.is_set() and self.on_stuck is not None and not self._stop.is_set():
            log.warning("job %s: cancel not acted on within %.1f s; stopping the worker",
                        self.job_id, CANCEL_GRACE_SECONDS)
            self.on_stuck()

    def check(self) -> None:
        if self.lost.is_set():
            raise Interrupted("lost")
        if self.cancelled.is_set():
            self.acknowledged.set()
            raise Interrupted("cancelled")


class Reporter:
    """The ``progress`` callback given to ``autoq.search``; also used for the service's stages.

    Records a stage event on each stage change (and its duration when it ends), and progress
    events at most every ``min_interval`` seconds or every 1 % of the stage. Raises
    :class:`Interrupted` when the job was cancelled, which stops ``search`` between steps.
    """

    def __init__(self, store: Store, job_id: str, worker_id: str, monitor: JobMonitor,
                 min_interval: float = 0.5):
        self.store, self.job_id, self.worker_id, self.monitor = store, job_id, worker_id, monitor
        self.min_interval = min_interval
        self.stage: str | None = None
        self.stage_started = 0.0
        self.progress = 0.0
        self._last_write = 0.0
        self._last_fraction = 0.0

    def check(self) -> None:
        self.monitor.check()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self.check()
        if stage != self.stage:
            self.enter(stage, message)
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.progress = max(self.progress, overall_progress(stage, fraction))
        now = time.monotonic()
        if now - self._last_write >= self.min_interval or fraction - self._last_fraction >= 0.01:
            self._write("progress", message or None)
            self._last_fraction = fraction

    def enter(self, stage: str, message: str | None = None) -> None:
        """Start a new stage (closing the timing of the previous one)."""
        self.check()
        self.close_stage()
        self.stage, self.stage_started = stage, time.monotonic()
        self.progress = max(self.progress, overall_progress(stage, 0.0))
        self._last_fraction = 0.0
        self._write("stage", message or stage)

    def note(self, message: str) -> None:
        self.check()
        self._write("progress", message)

    def close_stage(self) -> None:
        if self.stage is not None and not self.monitor.lost.is_set():
            seconds = time.monotonic() - self.stage_started
            self.store.record_stage_time(self.job_id, self.stage, round(seconds, 4))
            self.stage = None

    def _write(self, kind: str, message: str | None) -> None:
        self._last_write = time.monotonic()
        if not self.store.report(self.job_id, self.worker_id, kind, stage=self.stage,
                                 progress=round(self.progress, 4), message=message):
            self.monitor.lost.set()
            raise Interrupted("lost")


def overall_progress(stage: str, fraction: float) -> float:
    if stage not in STAGE_WEIGHTS:
        return 0.0
    return min(1.0, STAGE_START[stage] + STAGE_WEIGHTS[stage] * fraction)


def stop_cancelled_job(settings: Settings, store: Store, job_id: str, worker_id: str,
                       exit_process: Callable[[int], None] = os._exit) -> None:
    """The last resort for a cancel: mark the job cancelled, remove what it wrote, and end this
    worker process at once (its executor starts a fresh one)."""
    if store.finish(job_id, worker_id, CANCELLED, message="cancelled (the worker was stopped)"):
        remove_partial_artifacts(settings, job_id)
        shutil.rmtree(artifact_dir(settings, job_id), ignore_errors=True)
        log.info("job %s cancelled; worker %s exits", job_id, worker_id)
        exit_process(4)


def run_job(settings: Settings, store: Store, job: JobRow, worker_id: str, *,
            hard_stop: bool = True) -> str:
    """Run a job this worker has claimed; returns its final status (or "lost"). With
    ``hard_stop`` a cancel the job does not act on in time ends this process (see JobMonitor)."""
    interval = min(0.5, settings.lease_seconds / 4)
    remove_partial_artifacts(settings, job.id)
    on_stuck = (lambda: stop_cancelled_job(settings, store, job.id, worker_id)) if hard_stop else None
    with JobMonitor(store, job.id, worker_id, interval, on_stuck) as monitor:
        reporter = Reporter(store, job.id, worker_id, monitor)
        try:
            result = execute(settings, job, reporter)
            status, message, error = SUCCEEDED, result.pop("message"), None
        except Interrupted as e:
            if e.reason == "lost":
                log.warning("job %s: another worker owns it now; stopping", job.id)
                return "lost"
            status, message, error, result = CANCELLED, "cancelled", None, {}
        except Exception as e:
            log.exception("job %s failed", job.id)
            status, message, error, result = FAILED, "failed", readable_error(e, settings), {}
        finally:
            try:
                reporter.close_stage()
            except Exception:  # a failing database write must not take the worker down
                log.warning("job %s: could not record the last stage's time", job.id, exc_info=True)
            remove_partial_artifacts(settings, job.id)
    if not store.finish(job.id, worker_id, status, message=message, error=error, **result):
        log.warning("job %s: lost before it could be marked %s", job.id, status)
        return "lost"
    log.info("job %s %s", job.id, status)
    return status


def execute(settings: Settings, job: JobRow, reporter: Reporter) -> dict[str, Any]:
    """The library's pipeline (load -> calibration -> search -> apply -> export) into a temporary
    directory, then the artifact moved into place atomically; returns the finish fields."""
    from autoq.config import SearchConfig
    from autoq.pipeline import quantize

    request = JobCreate.model_validate(job.request)
    config = SearchConfig(effective_bits=request.effective_bits, formats=request.formats,
                          objective=request.objective, refine_trials=request.refine_trials,
                          method=request.method, cache_dir=str(settings.plan_cache))
    tmp = settings.artifacts_dir / f".tmp-{job.id}-{uuid.uuid4().hex[:8]}"
    checkpoint = tmp / "checkpoint"
    tmp.mkdir(parents=True)
    result = quantize(job.model_path, config,
                      calibration_texts=request.calibration.texts if request.calibration else None,
                      out_dir=checkpoint, export_format=request.export_format,
                      on_stage=reporter.enter, progress=reporter)
    plan = result.plan
    if plan.from_cache:
        reporter.note(f"reused cached plan {plan.cache_key}")
    reporter.check()
    etag, size = publish_artifact(settings, job.id, tmp, plan, reporter.check)
    return {
        "message": "reused a cached plan" if plan.from_cache else "done",
        "plan": plan.model_dump(mode="json"),
        "plan_key": plan.cache_key,
        "plan_cache_hit": bool(plan.from_cache),
        "plan_effective_bits": float(plan.effective_bits),
        "artifact_etag": etag,
        "artifact_size": size,
    }


def publish_artifact(settings: Settings, job_id: str, tmp: Path, plan: Any,
                     check: Callable[[], None]) -> tuple[str, int]:
    """Turn ``tmp/checkpoint`` into one tar (plus plan.json) and rename ``tmp`` to
    ``<artifacts>/<job id>/``, so a reader never sees a half-written artifact."""
    final = artifact_dir(settings, job_id)
    checkpoint = tmp / "checkpoint"
    etag, size = tar_directory(checkpoint, tmp / ARTIFACT_FILE, arcname=job_id)
    shutil.rmtree(checkpoint)
    plan.save(tmp / PLAN_FILE)
    check()
    if final.exists():  # left by an attempt that died after renaming
        shutil.rmtree(final)
    os.replace(tmp, final)
    return etag, size


def tar_directory(source: Path, target: Path, arcname: str) -> tuple[str, int]:
    """Write ``source`` as an uncompressed tar; returns (sha256 hex, size in bytes)."""

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(source, arcname=arcname, filter=anonymous, recursive=False)
        for path in sorted(source.rglob("*")):
            archive.add(path, arcname=f"{arcname}/{path.relative_to(source).as_posix()}",
                        filter=anonymous, recursive=False)
    digest = hashlib.sha256()
    with target.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), target.stat().st_size


def artifact_dir(settings: Settings, job_id: str) -> Path:
    return settings.artifacts_dir / job_id


def remove_partial_artifacts(settings: Settings, job_id: str) -> None:
    for partial in settings.artifacts_dir.glob(f".tmp-{job_id}-*"):
        shutil.rmtree(partial, ignore_errors=True)


def readable_error(error: BaseException, settings: Settings) -> str:
    """One line for the client: the exception's message, server paths masked, no traceback."""
    text = str(error) or type(error).__name__
    if not isinstance(error, ValueError | TypeError | FileNotFoundError):
        text = f"{type(error).__name__}: {text}"
    for path, name in ((settings.shared, "<shared>"), (settings.data_dir, "<data>")):
        text = text.replace(str(path), name)
    return text[:2000]
