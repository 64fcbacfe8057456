"""Entry point: ``serve()`` runs the API (uvicorn) and its job workers until interrupted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings, check_bind


def serve(host: str | None = None, port: int | None = None,
          data_dir: str | Path | None = None, **overrides: Any) -> None:
    """Run the autoq job service in the foreground.

    Args:
        host: interface to bind; default ``AUTOQ_HOST`` or ``127.0.0.1``. A non-loopback host
            needs tokens (``AUTOQ_TOKENS``) or ``allow_insecure_bind=True``.
        port: TCP port; default ``AUTOQ_PORT`` or ``8000``.
        data_dir: database, uploads, artifacts and plan cache; default ``AUTOQ_DATA_DIR`` or
            ``./autoq-data``.
        overrides: any other :class:`service.settings.Settings` field, e.g. ``workers=2``,
            ``model_roots=["/models"]``, ``executor="ray"``; they win over the environment.

    Raises:
        SystemExit: when the bind would expose the API without tokens.
    """
    given = {"host": host, "port": port, "data_dir": data_dir}
    settings = Settings(**{k: v for k, v in given.items() if v is not None}, **overrides)
    check_bind(settings)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=10)
