"""HTTP routes. Thin: validation is in ``schemas``, state in ``store``, work in ``jobs``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import autoq
from autoq.cache import PlanCache
from service import metrics
from service.executor import make_executor
from service.jobs import ARTIFACT_FILE, artifact_dir
from service.models import UnknownModel, delete_upload, resolve_model, store_upload
from service.schemas import (
    JOB_ID,
    MODEL_ID,
    Error,
    Health,
    Job,
    JobCreate,
    JobLinks,
    JobList,
    JobStatus,
    Model,
    ModelList,
    PlanList,
    Ready,
    timestamp,
)
from service.settings import Settings
from service.store import RUNNING, Conflict, JobRow, ModelRow, Store
from service.uploads import ArchiveError, ModelDirError, remove_tree

log = logging.getLogger("autoq.service")

MAX_JSON_BYTES = 64 * 1024 * 1024
SSE_POLL_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0
SSE_MAX_SECONDS = 3600.0
PLAN_KEY = r"^[A-Za-z0-9_-]{1,128}$"
CURSOR = r"^[0-9]{1,18}$"

JobId = Annotated[str, PathParam(pattern=JOB_ID, description="A job id (job_...).")]
ModelId = Annotated[str, PathParam(pattern=MODEL_ID, description="A model id (mdl_...).")]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed request", 401: "Missing or wrong bearer token", 404: "Not found",
        409: "Conflicts with the current state", 413: "Request body too large",
        422: "Invalid input", 503: "Not ready",
    }
    return {code: {"model": Error, "description": descriptions[code]} for code in codes}


# -- security ---------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="A token from AUTOQ_TOKENS.")


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    tokens = request.app.state.settings.token_values()
    if not tokens:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    matched = False
    for token in tokens:  # compare with every token, in constant time
        matched |= hmac.compare_digest(given, token)
    if not matched:
        raise HTTPException(401, "missing or invalid bearer token (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413), counting what is actually received."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[tuple[str, str], ...]):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = JSONResponse({"detail": self._message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes"


# -- helpers ---------------------------------------------------------------------------------


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def store_of(request: Request) -> Store:
    return request.app.state.store


def job_view(job: JobRow, timings: dict[str, float]) -> Job:
    request = job.request
    calibration = request.get("calibration")
    base = f"/v1/jobs/{job.id}"
    return Job(
        id=job.id, status=job.status, model=job.model,
        effective_bits=request["effective_bits"], formats=request.get("formats"),
        objective=request["objective"], export_format=request.get("export_format"),
        calibration_texts=len(calibration["texts"]) if calibration else None,
        refine_trials=request.get("refine_trials", 0),
        stage=job.stage, progress=job.progress, message=job.message, attempts=job.attempts,
        cancel_requested=job.cancel_requested, plan_cache_hit=job.plan_cache_hit,
        plan_key=job.plan_key, plan_effective_bits=job.plan_effective_bits, timings=timings,
        error=job.error, created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at), finished_at=timestamp(job.finished_at),
        updated_at=timestamp(job.updated_at),
        links=JobLinks(self=base, events=f"{base}/events", plan=f"{base}/plan",
                       artifact=f"{base}/artifact"),
    )


def model_view(model: ModelRow) -> Model:
    return Model(id=model.id, name=model.name, size_bytes=model.size_bytes, files=model.files,
                 sha256=model.sha256, created_at=timestamp(model.created_at))


def get_job_or_404(store: Store, job_id: str) -> JobRow:
    job = store.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def view_one(store: Store, job: JobRow) -> Job:
    return job_view(job, store.stage_timings([job.id])[job.id])


def request_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


async def receive_to_file(request: Request, path: Path, limit: int) -> tuple[int, str]:
    """Stream the request body to ``path``; (size, sha256). 413 as soon as it passes ``limit``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("xb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"model archive larger than the limit of {limit} bytes")
            digest.update(chunk)
            f.write(chunk)
    return size, digest.hexdigest()


def format_event(seq: int, kind: str, data: dict) -> str:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(store: Store, job_id: str, after: int) -> AsyncIterator[str]:
    """Events after ``after``; ends once the job is finished and every event was sent."""
    yield "retry: 2000\n\n"
    deadline = time.monotonic() + SSE_MAX_SECONDS
    last_sent = time.monotonic()
    while time.monotonic() < deadline:
        events = await run_in_threadpool(store.events_after, job_id, after)
        for event in events:
            yield format_event(event.seq, event.kind, {**event.data, "at": event.created_at})
            after = event.seq
        if events:
            last_sent = time.monotonic()
            continue
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None:
            return
        if job.finished:
            # The final status event is written with the status, so the query above saw it
            # unless it landed in between: look once more before ending.
            if not await run_in_threadpool(store.events_after, job_id, after, 1):
                return
            continue
        if time.monotonic() - last_sent >= SSE_KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(SSE_POLL_SECONDS)


# -- routes ----------------------------------------------------------------------------------

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=errors(401, 413))


@v1.post("/models", status_code=201, response_model=Model, tags=["models"],
         responses=errors(400, 422),
         openapi_extra={"requestBody": {"required": True, "content": {
             "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_model(
    request: Request,
    response: Response,
    name: Annotated[str | None, Query(max_length=200, description="A label for the model.")] = None,
) -> Model:
    """Upload a Hugging Face model directory as a tar (optionally compressed) or zip archive.

    Send the archive as the request body. Weights must be safetensors; archives with links,
    devices, absolute paths or ``..`` are refused.
    """
    settings, store = settings_of(request), store_of(request)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_upload_bytes:
        raise HTTPException(413, f"model archive larger than the limit of "
                                 f"{settings.max_upload_bytes} bytes")
    part = settings.tmp_dir / f"upload-{uuid.uuid4().hex}.part"
    try:
        size, sha256 = await receive_to_file(request, part, settings.max_upload_bytes)
        if size == 0:
            raise HTTPException(400, "empty request body: send the model archive (tar or zip)")
        model = await run_in_threadpool(store_upload, settings, store, part, name or "upload",
                                        sha256)
    except ArchiveError as e:
        raise HTTPException(400, f"bad archive: {e}") from None
    except ModelDirError as e:
        raise HTTPException(422, f"not a usable model: {e}") from None
    finally:
        part.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return model_view(model)


@v1.get("/models", response_model=ModelList, tags=["models"], responses=errors(422))
def list_models(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR)] = None,
) -> ModelList:
    models = store_of(request).list_models(limit, int(cursor) if cursor else None)
    next_cursor = str(models[-1].seq) if len(models) == limit else None
    return ModelList(items=[model_view(m) for m in models], next_cursor=next_cursor)


@v1.get("/models/{model_id}", response_model=Model, tags=["models"], responses=errors(404, 422))
def get_model(request: Request, model_id: ModelId) -> Model:
    model = store_of(request).get_model(model_id)
    if model is None:
        raise HTTPException(404, f"no model {model_id}")
    return model_view(model)


@v1.delete("/models/{model_id}", status_code=204, tags=["models"],
           responses=errors(404, 409, 422))
def delete_model(request: Request, model_id: ModelId) -> Response:
    try:
        model = delete_upload(settings_of(request), store_of(request), model_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if model is None:
        raise HTTPException(404, f"no model {model_id}")
    return Response(status_code=204)


@v1.post("/jobs", status_code=202, response_model=Job, tags=["jobs"], responses=errors(400, 422))
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255,
        description="Retrying with the same key and body returns the same job.")] = None,
) -> Job:
    """Queue a quantization job. Returns 202 with the job and a Location header."""
    settings, store = settings_of(request), store_of(request)
    try:
        model_path = resolve_model(settings, store, body.model)
    except UnknownModel as e:
        raise HTTPException(422, str(e)) from None
    data = body.model_dump(mode="json")
    try:
        job, created = store.create_job(model=body.model, model_path=model_path, request=data,
                                        request_hash=request_hash(data),
                                        idempotency_key=idempotency_key)
    except Conflict as e:
        raise HTTPException(422, str(e)) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return view_one(store, job)


@v1.get("/jobs", response_model=JobList, tags=["jobs"], responses=errors(422))
def list_jobs(
    request: Request,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR, description="next_cursor of the "
                                                                   "previous page.")] = None,
) -> JobList:
    """Jobs, newest first."""
    store = store_of(request)
    jobs = store.list_jobs(status, limit, int(cursor) if cursor else None)
    timings = store.stage_timings([job.id for job in jobs])
    next_cursor = str(jobs[-1].seq) if len(jobs) == limit else None
    return JobList(items=[job_view(job, timings[job.id]) for job in jobs],
                   next_cursor=next_cursor)


@v1.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=errors(404, 422))
def get_job(request: Request, job_id: JobId) -> Job:
    store = store_of(request)
    return view_one(store, get_job_or_404(store, job_id))


@v1.get("/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
        responses={200: {"description": "Server-sent events: status, stage and progress.",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                   **errors(404, 422)})
def job_events(
    request: Request,
    job_id: JobId,
    last_event_id: Annotated[int | None, Header(ge=0, le=2**62, description="Resume after "
                                                "this event (sent by EventSource clients).")] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Same as Last-Event-ID.")] = None,
) -> StreamingResponse:
    """Follow a job. The stream ends when the job is finished."""
    store = store_of(request)
    get_job_or_404(store, job_id)
    start = last_event_id if last_event_id is not None else (after or 0)
    return StreamingResponse(event_stream(store, job_id, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@v1.post("/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"],
         responses={202: {"model": Job, "description": "Cancel requested; the job stops at "
                                                        "its next step"},
                    **errors(404, 409, 422)})
def cancel_job(request: Request, response: Response, job_id: JobId) -> Job:
    """Cancel a job: at once when queued, between steps (within seconds) when running."""
    store = store_of(request)
    try:
        job = store.request_cancel(job_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    if job.status == RUNNING:
        response.status_code = 202
    return view_one(store, job)


@v1.get("/jobs/{job_id}/plan", response_model=dict[str, Any], tags=["jobs"],
        responses=errors(404, 409, 422))
def job_plan(request: Request, job_id: JobId) -> dict[str, Any]:
    """The plan the job found (the per-layer format assignment and its figures)."""
    job = get_job_or_404(store_of(request), job_id)
    if job.plan is None:
        raise HTTPException(409, f"job {job_id} is {job.status}; its plan is available once "
                                 f"it has succeeded")
    return job.plan


ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The checkpoint directory as a tar archive.",
          "content": {"application/x-tar": {}}},
    206: {"description": "Part of the archive (Range)."},
    304: {"description": "Not modified (If-None-Match)."},
    **errors(404, 409, 422),
}


@v1.head("/jobs/{job_id}/artifact", tags=["jobs"], response_class=FileResponse,
         responses=ARTIFACT_RESPONSES, operation_id="head_job_artifact")
@v1.get("/jobs/{job_id}/artifact", tags=["jobs"], response_class=FileResponse,
        responses=ARTIFACT_RESPONSES, operation_id="get_job_artifact")
def job_artifact(
    request: Request,
    job_id: JobId,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """Download the quantized checkpoint (a tar of its directory). Supports ETag and Range."""
    settings = settings_of(request)
    job = get_job_or_404(store_of(request), job_id)
    path = artifact_dir(settings, job.id) / ARTIFACT_FILE
    if job.artifact_etag is None or not path.is_file():
        raise HTTPException(409, f"job {job_id} is {job.status}; its checkpoint is available "
                                 f"once it has succeeded")
    etag = f'"{job.artifact_etag}"'
    if if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/x-tar", filename=f"{job.id}.tar",
                        headers={"ETag": etag})


@v1.delete("/jobs/{job_id}", status_code=204, tags=["jobs"], responses=errors(404, 409, 422))
def delete_job(request: Request, job_id: JobId) -> Response:
    """Delete a finished job, its events and its files (409 while queued or running)."""
    store = store_of(request)
    try:
        job = store.delete_job(job_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    remove_tree(artifact_dir(settings_of(request), job.id))
    return Response(status_code=204)


@v1.get("/plans", response_model=PlanList, tags=["plans"])
def list_plans(request: Request) -> PlanList:
    """The plan cache: plans found so far, reused by jobs with the same model, data and budget."""
    return PlanList(items=PlanCache(settings_of(request).plan_cache).list())


@v1.get("/plans/{key}", response_model=dict[str, Any], tags=["plans"],
        responses=errors(404, 422))
def get_plan(request: Request,
             key: Annotated[str, PathParam(pattern=PLAN_KEY)]) -> dict[str, Any]:
    plan = PlanCache(settings_of(request).plan_cache).get(key)
    if plan is None:
        raise HTTPException(404, f"no cached plan {key}")
    return plan.model_dump(mode="json")


ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@ops.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(request: Request, response: Response) -> Ready:
    """The database answers and the workers run."""
    checks = {"database": "ok", "workers": "ok"}
    state = request.app.state
    if not getattr(state, "started", False):
        checks["workers"] = "starting"
    else:
        checks["workers"] = state.executor.healthy() or "ok"
        try:
            state.store.ping()
        except Exception as e:
            log.warning("readiness: database check failed: %s", e)
            checks["database"] = "unreachable"
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        response.status_code = 503
    return Ready(status="ready" if ready else "not ready", checks=checks)


@ops.get("/metrics", response_class=PlainTextResponse)
def prometheus_metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics: jobs by status, queue length, stage durations."""
    state = request.app.state
    return PlainTextResponse(metrics.render(state.store, state.executor.healthy()),
                             media_type=metrics.CONTENT_TYPE)


# -- error handling --------------------------------------------------------------------------


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid"))
        message = re.sub(r"^(Value|Assertion) error, ", "", message)
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        items.append({"loc": loc, "msg": message, "type": str(error.get("type", "invalid"))})
    detail = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in items)
    return JSONResponse({"detail": detail or "invalid request", "errors": items}, status_code=422)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


# -- the application -------------------------------------------------------------------------


async def supervise(app: FastAPI) -> None:
    """Recover jobs whose worker died, keep workers running (or submit Ray tasks)."""
    settings, store, executor = app.state.settings, app.state.store, app.state.executor

    def tick() -> None:
        recovered = store.recover_expired(settings.lease_seconds, settings.job_retry_limit)
        if recovered:
            log.warning("recovered jobs whose worker was lost: %s", ", ".join(recovered))
        executor.tick()

    while True:
        try:
            await run_in_threadpool(tick)
        except Exception:
            log.exception("supervisor tick failed")
        await asyncio.sleep(1.0)


def remove_stale_uploads(settings: Settings, older_than: float = 3600.0) -> None:
    cutoff = time.time() - older_than
    for path in [*settings.tmp_dir.glob("upload-*.part"), *settings.models_dir.glob(".tmp-*")]:
        if path.stat().st_mtime < cutoff:
            remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    settings.make_dirs()
    store = Store(settings.database)
    await run_in_threadpool(store.create_all)
    remove_stale_uploads(settings)
    executor = make_executor(settings, store)
    app.state.store, app.state.executor = store, executor
    await run_in_threadpool(executor.start)
    supervisor = asyncio.create_task(supervise(app))
    app.state.started = True
    log.info("autoq service ready: data in %s, %d worker(s), executor %s",
             settings.data_dir, settings.workers, settings.executor)
    try:
        yield
    finally:
        app.state.started = False
        supervisor.cancel()
        await run_in_threadpool(executor.stop)
        store.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="autoq job service",
        version=autoq.__version__,
        description="Submit a model and a bits budget, follow progress, download the "
                    "quantized checkpoint.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    app.state.started = False
    app.include_router(v1)
    app.include_router(ops)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodyLimit, limit=MAX_JSON_BYTES, exempt=(("POST", "/v1/models"),))
    return app
