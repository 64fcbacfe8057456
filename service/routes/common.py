"""What every route shares: settings, store and auth as FastAPI dependencies; error mapping.

Routes raise domain errors (``store.Conflict``, :class:`NotFound`, ``uploads.TooLarge``, ...);
``service.app`` maps each kind to one status code, so a conflict is always a 409 and a missing
resource always a 404.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.schemas import JOB_ID, MODEL_ID, Error
from service.settings import Settings
from service.store import Store

T = TypeVar("T")

JobId = Annotated[str, PathParam(pattern=JOB_ID, description="A job id (job_...).")]
ModelId = Annotated[str, PathParam(pattern=MODEL_ID, description="A model id (mdl_...).")]
CURSOR = r"^[0-9]{1,18}$"

DESCRIPTIONS = {
    400: "Malformed request", 401: "Missing or wrong bearer token", 403: "Not allowed",
    404: "Not found", 409: "Conflicts with the current state", 413: "Too large",
    422: "Invalid input", 429: "Too many requests or queued jobs; retry after Retry-After",
    503: "The database is unavailable or busy; retry after Retry-After",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                               "schema": {"type": "integer", "minimum": 0}}}
AUTH_HEADER = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error codes, each with the Error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": Error, "description": DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = RETRY_AFTER
        if code == 401:
            entry["headers"] = AUTH_HEADER
        responses[code] = entry
    return responses


class NotFound(LookupError):
    """The resource does not exist (a 404 for the client)."""


def found(value: T | None, what: str) -> T:
    if value is None:
        raise NotFound(f"no {what}")
    return value


class Refused(Exception):
    """A refusal with its own status code (403, 404, 413, 422, 429) and optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


# -- dependencies ------------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]

bearer = HTTPBearer(auto_error=False, description="A token from AUTOQ_TOKENS.")


def token_matches(settings: Settings, given: bytes) -> bool:
    matched = False
    for token in settings.token_values():  # compare with every token, in constant time
        matched |= hmac.compare_digest(given, token)
    return matched


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """The bearer check (also done by ``app.TokenGate`` before any body is read)."""
    if not settings.tokens:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not token_matches(settings, given):
        raise HTTPException(401, "missing or invalid bearer token (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})
