"""The models a job may use: uploaded archives, bundled models and directories under the roots."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from autoq.models import BUNDLED, resolve_model_dir
from service.schemas import MODEL_ID
from service.settings import Settings
from service.store import ModelRow, Store, new_id
from service.uploads import ModelLimits, TooLarge, remove_tree, unpack


class UnknownModel(ValueError):
    """A job names a model the server cannot or may not use.

    ``status``: 404 when there is no such model, 403 when the server may not use it (outside
    the model roots), 422 when it is there but not a usable model directory.
    """

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Space:
    """Storage accounting for uploads: the global quota and the free-space floor.

    Bytes are reserved before they are written (from the archive's headers, or the upload's
    Content-Length), so concurrent uploads cannot together pass the quota.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored = 0  # reserved bytes that count against the quota (unpacked models)
        self._disk = 0  # reserved bytes of disk (the above and archives being received)

    def available(self, settings: Settings, store: Store) -> int:
        """Bytes an upload may still unpack to: under the quota and above the free-space floor."""
        with self._lock:
            quota = settings.storage_quota_bytes - store.storage_used() - self._stored
            settings.shared.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(settings.shared).free - self._disk - settings.min_free_bytes
        return min(quota, disk)

    @contextmanager
    def reserve(self, settings: Settings, store: Store, size: int, what: str, *,
                quota: bool = True) -> Iterator[None]:
        """Hold ``size`` bytes; TooLarge past the quota (when ``quota``) or the free space."""
        with self._lock:
            if quota:
                used = store.storage_used() + self._stored
                if used + size > settings.storage_quota_bytes:
                    raise TooLarge(f"{what} ({size} bytes) would pass the server's storage quota "
                                   f"({used} of {settings.storage_quota_bytes} bytes in use)")
            settings.shared.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(settings.shared).free - self._disk
            if free - size < settings.min_free_bytes:
                raise TooLarge(f"{what} ({size} bytes) would leave less than "
                               f"{settings.min_free_bytes} bytes of free disk space")
            self._disk += size
            self._stored += size if quota else 0
        try:
            yield
        finally:
            with self._lock:
                self._disk -= size
                self._stored -= size if quota else 0


SPACE = Space()


def limits_of(settings: Settings) -> ModelLimits:
    return ModelLimits(max_parameters=settings.max_model_parameters,
                       max_layers=settings.max_model_layers,
                       max_hidden_size=settings.max_model_hidden_size)


def store_upload(settings: Settings, store: Store, archive: Path, name: str, sha256: str
                 ) -> ModelRow:
    """Unpack and validate an uploaded archive, move it into place, record it.

    Raises ``uploads.ArchiveError`` (``uploads.TooLarge`` for a size refusal) or
    ``uploads.ModelDirError``; nothing is left behind on error.
    """
    model_id = new_id("mdl")
    work = settings.models_dir / f".tmp-{model_id}"
    with ExitStack() as stack:  # holds the space reservation until the model is recorded

        def check_space(declared: int) -> None:
            stack.enter_context(SPACE.reserve(settings, store, declared, "the unpacked model"))

        try:
            unpacked = unpack(archive, work, settings.max_extracted_bytes,
                              space_left=SPACE.available(settings, store),
                              check_space=check_space, limits=limits_of(settings))
            final = settings.models_dir / model_id
            os.replace(unpacked.path, final)
        finally:
            remove_tree(work)
        try:
            return store.add_model(ModelRow(id=model_id, name=name, path=str(final),
                                            size_bytes=unpacked.size_bytes, files=unpacked.files,
                                            sha256=sha256, created_at=time.time()))
        except BaseException:  # e.g. the database is down (a 503): leave nothing behind
            remove_tree(final)
            raise


def delete_upload(settings: Settings, store: Store, model_id: str) -> ModelRow | None:
    model = store.delete_model(model_id)
    if model is not None:
        remove_tree(settings.models_dir / model.id)
    return model


def resolve_model(settings: Settings, store: Store, spec: str) -> str:
    """What a job's ``model`` field refers to, as the spec ``autoq.models.load_model`` takes."""
    if spec.startswith("bundled:"):
        if spec not in BUNDLED:
            raise UnknownModel(f"unknown bundled model {spec[:100]!r}; available: "
                               f"{', '.join(BUNDLED)}", 404)
        return spec
    if spec.startswith("mdl_"):
        if not re.fullmatch(MODEL_ID, spec):
            raise UnknownModel(f"{spec[:200]!r} is not a valid model id (mdl_ and 32 hex digits)")
        model = store.get_model(spec)
        if model is None or not Path(model.path).is_dir():
            raise UnknownModel(f"no uploaded model {spec}; upload it with POST /v1/models", 404)
        return model.path
    try:
        return resolve_root_directory(settings, spec)
    except (OSError, RuntimeError, ValueError) as e:  # NUL byte, symlink loop, name too long
        if isinstance(e, UnknownModel):
            raise
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UnknownModel(f"no model directory at {spec[:200]!r}: {detail}", 404) from None


def resolve_root_directory(settings: Settings, spec: str) -> str:
    path = Path(spec)
    if not path.is_absolute():
        raise UnknownModel(
            f"unknown model {spec[:200]!r}: give an uploaded model id (mdl_...), a bundled model "
            f"({', '.join(BUNDLED)}) or an absolute directory under the server's model roots")
    if not settings.model_roots:
        raise UnknownModel("this server has no model roots (AUTOQ_MODEL_ROOTS), so jobs cannot "
                           "use server directories; upload the model with POST /v1/models", 403)
    if "\x00" in spec:
        raise UnknownModel("the model path contains a NUL byte")
    # Resolve symlinks and '..' first: a link inside a root may point anywhere.
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in settings.model_roots):
        raise UnknownModel(f"{spec[:200]!r} is outside the server's model roots", 403)
    if not real.is_dir():
        raise UnknownModel(f"no model directory at {spec[:200]!r}", 404)
    try:
        return str(resolve_model_dir(real))
    except ValueError as e:
        raise UnknownModel(str(e)) from None
