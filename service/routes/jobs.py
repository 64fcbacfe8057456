"""``/v1/jobs``: submit, list, follow (server-sent events), cancel, download and delete jobs."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.jobs import ARTIFACT_FILE, artifact_dir
from service.models import resolve_model
from service.routes.common import (
    CURSOR,
    JobId,
    Refused,
    SettingsDep,
    StoreDep,
    errors,
    found,
)
from service.routes.feeds import event_stream
from service.schemas import (
    Job,
    JobCreate,
    JobLinks,
    JobList,
    JobStatus,
    event_stream_schema,
    timestamp,
)
from service.settings import Settings
from service.store import RUNNING, JobRow, Store, request_summary
from service.uploads import remove_tree

router = APIRouter(prefix="/jobs", tags=["jobs"])

EVENT_ID = r"^[0-9]{1,18}$"


def job_view(job: JobRow, timings: dict[str, float]) -> Job:
    summary = job.summary if job.summary is not None else request_summary(job.request)
    base = f"/v1/jobs/{job.id}"
    return Job(
        id=job.id, status=job.status, model=job.model,  # type: ignore[arg-type]
        effective_bits=summary["effective_bits"], formats=summary.get("formats"),
        objective=summary["objective"], export_format=summary.get("export_format"),
        calibration_texts=summary.get("calibration_texts"),
        refine_trials=summary.get("refine_trials", 0),
        stage=job.stage, progress=job.progress, message=job.message, attempts=job.attempts,
        cancel_requested=job.cancel_requested, plan_cache_hit=job.plan_cache_hit,
        plan_key=job.plan_key, plan_effective_bits=job.plan_effective_bits, timings=timings,
        error=job.error, created_at=timestamp(job.created_at),  # type: ignore[arg-type]
        started_at=timestamp(job.started_at), finished_at=timestamp(job.finished_at),
        updated_at=timestamp(job.updated_at),  # type: ignore[arg-type]
        links=JobLinks(self=base, events=f"{base}/events", plan=f"{base}/plan",
                       report=f"{base}/report", artifact=f"{base}/artifact"),
    )


def view_one(store: Store, job: JobRow) -> Job:
    return job_view(job, store.stage_timings([job.id])[job.id])


def client_key(request: Request, settings: Settings) -> str:
    """Who is asking, for the per-client limits: a digest of the bearer token when the server
    has tokens (the token itself is never stored), else the client's address (an Authorization
    header a tokenless server ignores does not make a new client)."""
    if settings.tokens:
        _, _, token = request.headers.get("authorization", "").partition(" ")
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:40]
    return "addr:" + (request.client.host if request.client else "unknown")


def request_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@router.post("", status_code=202, response_model=Job,
             responses=errors(400, 403, 404, 409, 422, 429))
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
        description="Retrying with the same key and body returns the same job; the same key "
                    "with another body is a 409.")] = None,
) -> Job:
    """Queue a quantization job. Returns 202 with the job and a Location header.

    The model must exist (404) and be one this server may use (403 outside the model roots,
    422 when it is not a usable model directory). 429 (with ``Retry-After``) when the queue is
    full, or when this client (its bearer token; its address on a server without tokens)
    already has ``AUTOQ_MAX_JOBS_PER_TOKEN`` jobs queued or running: wait for one to finish or
    cancel one.
    """
    model_path = resolve_model(settings, store, body.model)
    data = body.model_dump(mode="json")
    job, created = store.create_job(model=body.model, model_path=model_path, request=data,
                                    request_hash=request_hash(data),
                                    idempotency_key=idempotency_key,
                                    owner=client_key(request, settings))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return view_one(store, job)


@router.get("", response_model=JobList, responses=errors(422))
def list_jobs(
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs with this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR, description="next_cursor of the "
                                                                   "previous page.")] = None,
) -> JobList:
    """Jobs, newest first."""
    jobs = store.list_jobs(status, limit, int(cursor) if cursor else None)
    timings = store.stage_timings([job.id for job in jobs])
    next_cursor = str(jobs[-1].seq) if len(jobs) == limit else None
    return JobList(items=[job_view(job, timings[job.id]) for job in jobs],
                   next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, responses=errors(404, 422))
def get_job(store: StoreDep, job_id: JobId) -> Job:
    return view_one(store, found(store.get_job_view(job_id), f"job {job_id}"))


# -- events ----------------------------------------------------------------------------------


class StreamSlots:
    """Open event streams per client (bearer token, or address when the server has none)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()  # taken on worker threads, given back on the event loop

    def take(self, client: str, limit: int) -> None:
        with self._lock:
            if self.open.get(client, 0) >= limit:
                raise Refused(429, f"{limit} event streams are open for this client already; "
                                   f"close one or poll GET /v1/jobs/{{job_id}}",
                              {"Retry-After": "5"})
            self.open[client] = self.open.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        with self._lock:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]




@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"description": "Server-sent events (status, stage, progress), "
                                            "each with a JSON `data`; the stream ends when the "
                                            "job is finished.",
                             "content": {"text/event-stream": {"schema": event_stream_schema()}}},
                       **errors(404, 422, 429)})
def job_events(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    job_id: JobId,
    last_event_id: Annotated[str | None, Header(
        pattern=EVENT_ID, description="Resume after this event (sent by EventSource "
                                      "clients).")] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Same as Last-Event-ID.")]
    = None,
) -> StreamingResponse:
    """Follow a job. The stream ends when the job is finished."""
    found(store.job_status(job_id), f"job {job_id}")
    start = int(last_event_id) if last_event_id is not None else (after or 0)
    slots: StreamSlots = request.app.state.streams
    client = client_key(request, settings)
    slots.take(client, settings.max_event_streams)
    return EventStreamResponse(event_stream(request.app.state.feeds, job_id, start),
                               release=lambda: slots.give_back(client))


class EventStreamResponse(StreamingResponse):
    """An event stream that gives its slot back however it ends (even before it started)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


# -- actions ---------------------------------------------------------------------------------


@router.post("/{job_id}/cancel", response_model=Job,
             responses={202: {"model": Job, "description": "Cancel requested; the job stops at "
                                                           "its next step"},
                        **errors(404, 409, 422)})
def cancel_job(response: Response, store: StoreDep, job_id: JobId) -> Job:
    """Cancel a job: at once when queued (200), between steps when running (202)."""
    job = found(store.request_cancel(job_id), f"job {job_id}")
    if job.status == RUNNING:
        response.status_code = 202
    return view_one(store, job)


@router.get("/{job_id}/plan", response_model=dict[str, Any], responses=errors(404, 409, 422))
def job_plan(store: StoreDep, job_id: JobId) -> dict[str, Any]:
    """The plan the job found (the per-layer format assignment and its figures)."""
    status, plan = found(store.get_plan(job_id), f"job {job_id}")
    if plan is None:
        raise Refused(409, f"job {job_id} is {status}; its plan is available once it has "
                           f"succeeded")
    return plan


REPORT_SECONDS = 3.0  # budget-curve solves stop after this; the page says when it is coarser


# The route's own class stays JSON so the error bodies are documented as JSON; the page itself
# is returned as an HTMLResponse.
@router.get("/{job_id}/report", response_model=None, responses={
    **errors(404, 409, 422), 200: {"content": {"text/html": {"schema": {"type": "string"}}},
                                   "description": "A self-contained HTML page of the plan's charts."}})
def job_report(store: StoreDep, job_id: JobId) -> HTMLResponse:
    """The plan as one self-contained HTML page: bits per layer, sensitivity heatmap, predicted
    latency, budget curve, dropped formats, stage times (as ``autoq plan report``)."""
    from autoq.plan import Plan
    from autoq.report import render_report

    status, plan = found(store.get_plan(job_id), f"job {job_id}")
    if plan is None:
        raise Refused(409, f"job {job_id} is {status}; its report is available once it has succeeded")
    return HTMLResponse(render_report(Plan.model_validate(plan), curve_seconds=REPORT_SECONDS))


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison: ``*``, or any listed tag equal to ``etag`` ignoring ``W/``."""
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


TAR = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The checkpoint directory as a tar archive.", "content": TAR},
    206: {"description": "Part of the archive (Range).", "content": {
        **TAR, "multipart/byteranges": {"schema": {"type": "string", "format": "binary"}}}},
    304: {"description": "Not modified (If-None-Match)."},
    416: {"description": "Range not satisfiable."},
    **errors(404, 409, 422),
}


@router.head("/{job_id}/artifact", response_class=FileResponse, responses=ARTIFACT_RESPONSES,
             operation_id="head_job_artifact")
@router.get("/{job_id}/artifact", response_class=FileResponse, responses=ARTIFACT_RESPONSES,
            operation_id="get_job_artifact")
def job_artifact(
    settings: SettingsDep,
    store: StoreDep,
    job_id: JobId,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """Download the quantized checkpoint (a tar of its directory). Supports ETag and Range."""
    job = found(store.get_job_view(job_id), f"job {job_id}")
    path = artifact_dir(settings, job.id) / ARTIFACT_FILE
    if job.artifact_etag is None or not path.is_file():
        raise Refused(409, f"job {job_id} is {job.status}; its checkpoint is available once it "
                           f"has succeeded")
    etag = f'"{job.artifact_etag}"'
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/x-tar", filename=f"{job.id}.tar",
                        headers={"ETag": etag})


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses=errors(404, 409, 422))
def delete_job(settings: SettingsDep, store: StoreDep, job_id: JobId) -> Response:
    """Delete a finished job, its events and its files (409 while queued or running)."""
    job = found(store.delete_job(job_id), f"job {job_id}")
    remove_tree(artifact_dir(settings, job.id))
    return Response(status_code=204)
