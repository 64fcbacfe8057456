"""The models a job may use: uploaded archives, bundled models and directories under the roots."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from autoq.models import BUNDLED, resolve_model_dir
from service.schemas import MODEL_ID
from service.settings import Settings
from service.store import ModelRow, Store, new_id
from service.uploads import remove_tree, unpack


class UnknownModel(ValueError):
    """A job names a model the server cannot or may not use (a 422 for the client)."""


def store_upload(settings: Settings, store: Store, archive: Path, name: str, sha256: str
                 ) -> ModelRow:
    """Unpack and validate an uploaded archive, move it into place, record it.

    Raises ``uploads.ArchiveError`` or ``uploads.ModelDirError``; nothing is left behind on error.
    """
    model_id = new_id("mdl")
    work = settings.models_dir / f".tmp-{model_id}"
    try:
        unpacked = unpack(archive, work, settings.max_extracted_bytes)
        final = settings.models_dir / model_id
        os.replace(unpacked.path, final)
    finally:
        remove_tree(work)
    return store.add_model(ModelRow(id=model_id, name=name, path=str(final),
                                    size_bytes=unpacked.size_bytes, files=unpacked.files,
                                    sha256=sha256, created_at=time.time()))


def delete_upload(settings: Settings, store: Store, model_id: str) -> ModelRow | None:
    model = store.delete_model(model_id)
    if model is not None:
        remove_tree(settings.models_dir / model.id)
    return model


def resolve_model(settings: Settings, store: Store, spec: str) -> str:
    """What a job's ``model`` field refers to, as the spec ``autoq.models.load_model`` takes."""
    if spec.startswith("bundled:"):
        if spec not in BUNDLED:
            raise UnknownModel(f"unknown bundled model {spec!r}; available: {', '.join(BUNDLED)}")
        return spec
    if spec.startswith("mdl_"):
        if not re.fullmatch(MODEL_ID, spec):
            raise UnknownModel(f"{spec!r} is not a valid model id (mdl_ and 32 hex digits)")
        model = store.get_model(spec)
        if model is None or not Path(model.path).is_dir():
            raise UnknownModel(f"no uploaded model {spec}; upload it with POST /v1/models")
        return model.path
    return resolve_root_directory(settings, spec)


def resolve_root_directory(settings: Settings, spec: str) -> str:
    path = Path(spec)
    if not path.is_absolute():
        raise UnknownModel(
            f"unknown model {spec[:200]!r}: give an uploaded model id (mdl_...), a bundled model "
            f"({', '.join(BUNDLED)}) or an absolute directory under the server's model roots")
    if not settings.model_roots:
        raise UnknownModel("this server has no model roots (AUTOQ_MODEL_ROOTS), so jobs cannot "
                           "use server directories; upload the model with POST /v1/models")
    # Resolve symlinks and '..' first: a link inside a root may point anywhere.
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in settings.model_roots):
        raise UnknownModel(f"{spec[:200]!r} is outside the server's model roots")
    try:
        return str(resolve_model_dir(real))
    except ValueError as e:
        raise UnknownModel(str(e)) from None
