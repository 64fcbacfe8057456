"""The application: routes (``service.routes``), middleware, error mapping, OpenAPI, lifespan.

Thin: validation is in ``schemas``, state in ``store``, work in ``jobs``. Every refusal kind has
one status code, mapped here: a conflict 409, a missing resource 404, a size refusal 413, a full
queue or too many streams 429, a database that is down or busy 503 (with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import autoq
from service.executor import make_executor
from service.jobs import artifact_dir
from service.models import UnknownModel
from service.routes import jobs, models, ops, plans
from service.routes.common import NotFound, Refused, errors, require_token, token_matches
from service.routes.feeds import Feeds
from service.settings import Settings
from service.store import Conflict, QueueFull, QuotaExceeded, Store
from service.uploads import ArchiveError, ModelDirError, TooLarge, remove_tree

log = logging.getLogger("autoq.service")

MAX_JSON_BYTES = 64 * 1024 * 1024
V1 = "/v1"
UNAUTHORIZED = "missing or invalid bearer token (Authorization: Bearer ...)"


# -- middleware --------------------------------------------------------------------------------


class TokenGate:
    """Refuse ``/v1`` requests without a valid bearer token before anything reads their body.

    FastAPI resolves dependencies only after it has read and parsed the body; this gate answers
    the 401 first. (``require_token`` checks again, and documents the scheme in OpenAPI.)
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and self.settings.tokens
                and (path == V1 or path.startswith(V1 + "/"))):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token_matches(self.settings, token.strip()):
                response = JSONResponse({"detail": UNAUTHORIZED}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
                    raise TooLarge(self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes"


# -- error handling --------------------------------------------------------------------------


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def allowed_methods(request: Request) -> str:
    """The methods the schema documents for this path, for a 405's ``Allow`` header."""
    app = request.app
    if getattr(app.state, "allow", None) is None:
        app.state.allow = [(compile_path(path)[0], ", ".join(method.upper() for method in methods))
                           for path, methods in app.openapi()["paths"].items()]
    path = request.scope.get("path", "")
    return next((methods for pattern, methods in app.state.allow if pattern.match(path)), "")


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return error(exc.status_code, str(exc.detail), headers or None)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    items = []
    for item in exc.errors():
        message = str(item.get("msg", "invalid"))
        message = re.sub(r"^(Value|Assertion) error, ", "", message)
        loc = [part if isinstance(part, int) else str(part) for part in item.get("loc", ())]
        items.append({"loc": loc, "msg": message, "type": str(item.get("type", "invalid"))})
    detail = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in items)
    return JSONResponse({"detail": detail or "invalid request", "errors": items}, status_code=422)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    """One status code per kind of refusal."""
    if isinstance(exc, Refused):
        return error(exc.status, exc.detail, exc.headers)
    if isinstance(exc, UnknownModel):
        return error(exc.status, str(exc))
    if isinstance(exc, NotFound):
        return error(404, str(exc))
    if isinstance(exc, Conflict):
        return error(409, str(exc))
    if isinstance(exc, QueueFull):
        return error(429, str(exc), {"Retry-After": "30"})
    if isinstance(exc, QuotaExceeded):
        return error(429, str(exc), {"Retry-After": "30"})
    if isinstance(exc, TooLarge):
        return error(413, str(exc))
    if isinstance(exc, ArchiveError):
        return error(400, f"bad archive: {exc}")
    if isinstance(exc, ModelDirError):
        return error(422, f"not a usable model: {exc}")
    raise exc


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
    return error(503, "the database is unavailable or busy; retry shortly", {"Retry-After": "2"})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


# -- OpenAPI ---------------------------------------------------------------------------------


def describe(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI schema of this server as configured.

    With tokens, every ``/v1`` operation requires the bearer scheme and may answer 401; without
    (a loopback server), there is no security scheme and no 401. Optional query and header
    parameters are described by their type alone (an absent parameter, not ``null``).
    """
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    secured = bool(settings.tokens)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if not path.startswith(V1):
                continue
            if not secured:
                operation.pop("security", None)
                operation.get("responses", {}).pop("401", None)
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in ("query", "header") and not parameter.get("required"):
                    parameter["schema"] = without_null(parameter["schema"])
    if not secured:
        schema.get("components", {}).pop("securitySchemes", None)
    return schema


def without_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if not options:
        return schema
    rest = [option for option in options if option.get("type") != "null"]
    if len(rest) != 1:
        return schema
    merged = {key: value for key, value in schema.items() if key != "anyOf"}
    merged.update(rest[0])
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


# -- the application -------------------------------------------------------------------------


RETENTION_EVERY = 60.0


def apply_retention(settings: Settings, store: Store, now: float | None = None) -> None:
    """Delete what the retention settings say has been kept long enough."""
    now = time.time() if now is None else now
    if settings.job_retention_seconds is not None:
        for job_id in store.finished_before(now - settings.job_retention_seconds):
            try:
                store.delete_job(job_id)
            except Conflict:  # no longer finished (cannot happen today): leave it
                continue
            remove_tree(artifact_dir(settings, job_id))
    if settings.artifact_retention_seconds is not None:
        for job_id in store.drop_artifacts(now - settings.artifact_retention_seconds):
            remove_tree(artifact_dir(settings, job_id))
    if settings.event_retention_seconds is not None:
        store.drop_events(now - settings.event_retention_seconds)


async def supervise(app: FastAPI) -> None:
    """Recover jobs whose worker died, keep workers running (or submit Ray tasks), and apply
    the retention settings (once a minute)."""
    settings, store, executor = app.state.settings, app.state.store, app.state.executor
    retained_at = 0.0

    def tick() -> None:
        nonlocal retained_at
        recovered = store.recover_expired(settings.lease_seconds, settings.job_retry_limit)
        if recovered:
            log.warning("recovered jobs whose worker was lost: %s", ", ".join(recovered))
        executor.tick()
        if time.monotonic() - retained_at >= RETENTION_EVERY:
            retained_at = time.monotonic()
            apply_retention(settings, store)

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
    store = Store(settings.database, max_queued=settings.max_queued_jobs,
                  max_per_owner=settings.max_jobs_per_token)
    await run_in_threadpool(store.create_all)
    remove_stale_uploads(settings)
    executor = make_executor(settings, store)
    app.state.store, app.state.executor = store, executor
    app.state.feeds = Feeds(store)
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
    settings = settings or Settings()
    app = FastAPI(
        title="autoq job service",
        version=autoq.__version__,
        description="Submit a model and a bits budget, follow progress, download the "
                    "quantized checkpoint.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.started = False
    app.state.streams = jobs.StreamSlots()
    v1 = APIRouter(prefix=V1, dependencies=[Depends(require_token)],
                   responses=errors(401, 413, 503))
    for module in (models, jobs, plans):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(ops.router)
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    for kind in (Refused, UnknownModel, NotFound, Conflict, QueueFull, QuotaExceeded,
                 ArchiveError, ModelDirError):
        app.add_exception_handler(kind, domain_error)
    for kind in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(kind, database_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodyLimit, limit=MAX_JSON_BYTES, exempt=(("POST", "/v1/models"),))
    app.add_middleware(TokenGate, settings=settings)  # outermost: before any body is read

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
