"""``/v1/models``: upload, list, read and delete model archives."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.models import SPACE, delete_upload, store_upload
from service.routes.common import CURSOR, ModelId, SettingsDep, StoreDep, errors, found
from service.schemas import Model, ModelList, timestamp
from service.store import ModelRow
from service.uploads import ArchiveError, TooLarge

router = APIRouter(prefix="/models", tags=["models"])

ARCHIVE_TYPES = ("application/octet-stream", "application/x-tar", "application/gzip",
                 "application/zip")
ARCHIVE_BODY = {"requestBody": {"required": True, "content": {
    media_type: {"schema": {"type": "string", "format": "binary", "minLength": 1}}
    for media_type in ARCHIVE_TYPES}}}


def model_view(model: ModelRow) -> Model:
    return Model(id=model.id, name=model.name, size_bytes=model.size_bytes, files=model.files,
                 sha256=model.sha256, created_at=timestamp(model.created_at))


async def receive_to_file(request: Request, path: Path, limit: int) -> tuple[int, str]:
    """Stream the request body to ``path``; (size, sha256). 413 as soon as it passes ``limit``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("xb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"model archive larger than the limit of {limit} bytes")
            digest.update(chunk)
            f.write(chunk)
    return size, digest.hexdigest()


@router.post("", status_code=201, response_model=Model, openapi_extra=ARCHIVE_BODY,
             responses=errors(400, 413, 422))
async def upload_model(
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200,
                                      description="A label for the model.")] = None,
) -> Model:
    """Upload a Hugging Face model directory as a tar (optionally compressed) or zip archive.

    Send the archive as the request body. Weights must be safetensors (``model.safetensors``
    or shards listed by ``model.safetensors.index.json``), complete for the config; archives
    with links, devices, absolute paths or ``..`` are refused (400), so are archives over the
    size limits, the storage quota or the free disk space (413), and directories that are not
    a usable model (422).

    The body's schema is any non-empty bytes: no schema can say which bytes are an archive of a
    complete model, so bytes that match it are not necessarily accepted; what is not a tar or
    zip is refused with 400 and an archive that does not hold a usable model with 422.
    """
    length = request.headers.get("content-length", "")
    expected = int(length) if length.isdigit() else settings.max_upload_bytes
    if expected > settings.max_upload_bytes:
        raise TooLarge(f"model archive larger than the limit of {settings.max_upload_bytes} bytes")
    part = settings.tmp_dir / f"upload-{uuid.uuid4().hex}.part"
    try:
        # Held while the body arrives; once it is on disk, the free space counts it.
        with SPACE.reserve(settings, store, expected, "the archive", quota=False):
            size, sha256 = await receive_to_file(request, part, settings.max_upload_bytes)
        if size == 0:
            raise ArchiveError("empty request body: send the model archive (tar or zip)")
        model = await run_in_threadpool(store_upload, settings, store, part, name or "upload",
                                        sha256)
    finally:
        part.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return model_view(model)


@router.get("", response_model=ModelList, responses=errors(422))
def list_models(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=CURSOR, description="next_cursor of the "
                                                                   "previous page.")] = None,
) -> ModelList:
    """Uploaded models, newest first."""
    models = store.list_models(limit, int(cursor) if cursor else None)
    next_cursor = str(models[-1].seq) if len(models) == limit else None
    return ModelList(items=[model_view(m) for m in models], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=Model, responses=errors(404, 422))
def get_model(store: StoreDep, model_id: ModelId) -> Model:
    return model_view(found(store.get_model(model_id), f"model {model_id}"))


@router.delete("/{model_id}", status_code=204, response_class=Response,
               responses=errors(404, 409, 422))
def delete_model(settings: SettingsDep, store: StoreDep, model_id: ModelId) -> Response:
    """Delete an uploaded model (409 while a queued or running job uses it)."""
    found(delete_upload(settings, store, model_id), f"model {model_id}")
    return Response(status_code=204)
