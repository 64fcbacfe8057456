"""Operations: liveness, readiness and Prometheus metrics (never behind a token)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from service import metrics
from service.routes.common import RETRY_AFTER
from service.schemas import Health, Ready

log = logging.getLogger("autoq.service")

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (answered on the event loop: no worker thread needed)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready,
            responses={503: {"model": Ready, "description": "Not ready", "headers": RETRY_AFTER}})
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
        response.headers["Retry-After"] = "5"
    return Ready(status="ready" if ready else "not ready", checks=checks)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4."},
                       503: {"description": "The database is unavailable",
                             "headers": RETRY_AFTER,
                             "content": {"application/json": {"schema": {
                                 "$ref": "#/components/schemas/Error"}}}}})
def prometheus_metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics: jobs by status, queue length, stage durations."""
    state = request.app.state
    return PlainTextResponse(metrics.render(state.store, state.executor.healthy()),
                             media_type=metrics.CONTENT_TYPE)
