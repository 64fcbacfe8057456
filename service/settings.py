"""Service settings, read from ``AUTOQ_*`` environment variables (or passed to ``serve()``).

List settings (``AUTOQ_TOKENS``, ``AUTOQ_MODEL_ROOTS``) are comma-separated strings.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GiB = 1024**3


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOQ_", extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    data_dir: Path = Field(Path("autoq-data"), description="Database, uploads, artifacts, plan cache.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: a SQLite file autoq.db in the data dir."
    )
    tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer tokens accepted on /v1 (comma-separated)."
    )
    allow_insecure_bind: bool = Field(
        False, description="Allow binding a non-loopback host with no tokens configured."
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Directories whose models a job may reference."
    )
    max_upload_bytes: int = Field(4 * GiB, gt=0, description="Largest accepted model archive.")
    max_extracted_bytes: int = Field(8 * GiB, gt=0, description="Largest unpacked model upload.")
    storage_quota_bytes: int = Field(
        100 * GiB, gt=0, description="Most bytes kept for uploaded models and checkpoints, together."
    )
    min_free_bytes: int = Field(
        1 * GiB, ge=0, description="Free disk space an upload must leave in the shared dir."
    )
    max_model_parameters: int = Field(
        20_000_000_000, gt=0, description="Largest model (parameters its config implies) accepted."
    )
    max_model_layers: int = Field(256, gt=0, description="Most layers a model's config may ask for.")
    max_model_hidden_size: int = Field(
        32_768, gt=0, description="Largest hidden size a model's config may ask for."
    )
    max_queued_jobs: int = Field(1000, gt=0, description="Jobs that may wait at once (429 past it).")
    max_jobs_per_token: int = Field(
        20, gt=0, description="Jobs one client (bearer token, or address when there are no "
                              "tokens) may have queued or running at once (429 past it).")
    job_retention_seconds: float | None = Field(
        None, gt=0, description="Finished jobs older than this are deleted, with their events and "
                                "files (default: kept)."
    )
    event_retention_seconds: float | None = Field(
        None, gt=0, description="Events of jobs finished longer ago than this are deleted "
                                "(default: kept)."
    )
    artifact_retention_seconds: float | None = Field(
        None, gt=0, description="Checkpoints of jobs finished longer ago than this are deleted; "
                                "the job stays (default: kept)."
    )
    max_event_streams: int = Field(
        64, gt=0, description="Event streams one client (token, or address) may hold open."
    )
    workers: int = Field(1, ge=0, description="Jobs run at once (0: this process runs none).")
    executor: Literal["local", "ray"] = Field("local", description="Where jobs run.")
    job_retry_limit: int = Field(
        2, ge=0, description="Times a job whose worker was lost is re-queued before it fails."
    )
    shared_dir: Path | None = Field(
        None, description="Uploaded models and artifacts (shared by Ray nodes); default: data dir."
    )
    cache_dir: Path | None = Field(
        None, description="autoq's plan cache (plans, statistics, timings); default: "
                          "<shared dir>/cache.")
    lease_seconds: float = Field(
        30.0, gt=0, description="A running job whose heartbeat is older than this is recovered."
    )
    poll_seconds: float = Field(0.5, gt=0, description="How often idle workers look for jobs.")
    ray_address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS, else a new local Ray."
    )
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs each Ray job reserves; default: 1 if the cluster has any."
    )
    log_level: str = Field("info", description="Logging level.")

    _split = field_validator("tokens", "model_roots", mode="before")(_split_commas)

    @field_validator("data_dir", "shared_dir", "cache_dir", mode="after")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return path.expanduser().resolve() if path is not None else None

    @field_validator("model_roots", mode="after")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        return [root.expanduser().resolve() for root in roots]

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'autoq.db'}"

    @property
    def shared(self) -> Path:
        return self.shared_dir or self.data_dir

    @property
    def models_dir(self) -> Path:
        return self.shared / "models"

    @property
    def artifacts_dir(self) -> Path:
        return self.shared / "artifacts"

    @property
    def plan_cache(self) -> Path:
        return self.cache_dir or self.shared / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def token_values(self) -> list[bytes]:
        return [token.get_secret_value().encode() for token in self.tokens]

    def make_dirs(self) -> None:
        for path in (self.data_dir, self.tmp_dir, self.models_dir, self.artifacts_dir,
                     self.plan_cache):
            path.mkdir(parents=True, exist_ok=True)

    def for_workers(self) -> dict:
        """What a worker process needs to rebuild these settings (no tokens)."""
        return self.model_dump(mode="json", exclude={"tokens"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to listen beyond this machine with no tokens, unless explicitly allowed."""
    if is_loopback(settings.host) or settings.tokens or settings.allow_insecure_bind:
        return
    raise SystemExit(
        f"refusing to bind {settings.host}: no tokens are configured, so anyone who can reach "
        "the port could run jobs. Set AUTOQ_TOKENS (comma-separated bearer tokens), bind "
        "127.0.0.1, or set AUTOQ_ALLOW_INSECURE_BIND=true."
    )
