"""Request and response models of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from autoq import formats as format_registry
from autoq.checkpoint import WRITERS
from autoq.solve import OBJECTIVES

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

JOB_ID = r"^job_[0-9a-f]{32}$"
MODEL_ID = r"^mdl_[0-9a-f]{32}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Text = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]


class Calibration(Strict):
    texts: list[Text] = Field(
        min_length=1, max_length=4096,
        description="Sentences the model is run on while searching (default: autoq's bundled set).",
    )


class JobCreate(Strict):
    model: str = Field(
        min_length=1, max_length=4096,
        description="An uploaded model id (mdl_...), a bundled model (bundled:minilm), or an "
                    "absolute directory under the server's model roots.",
        examples=["bundled:minilm"],
    )
    effective_bits: float = Field(
        ge=2, le=16, allow_inf_nan=False,
        description="Budget: average bits per weight over the quantized layers, in [2, 16].",
    )
    formats: list[str] | None = Field(
        None, min_length=1, max_length=32,
        description="Candidate formats (default: all). See autoq.formats.",
    )
    objective: str = Field("balanced", description=f"One of: {', '.join(OBJECTIVES)}.")
    calibration: Calibration | None = None
    refine_trials: int = Field(
        0, ge=0, le=200,
        description="Trials of the optional refinement stage (measured loss on held-out "
                    "calibration batches); 0 skips it.",
    )
    export_format: str | None = Field(None, description=(
        "Checkpoint format: compressed-tensors or autoq (default: compressed-tensors when the "
        "model can be expressed in it, else autoq)."))

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        valid = format_registry.names()
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; "
                             f"valid formats: {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise ValueError("formats lists a format more than once")
        return names

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, objective: str) -> str:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of: "
                             f"{', '.join(OBJECTIVES)}")
        return objective

    @field_validator("export_format")
    @classmethod
    def _known_export_format(cls, name: str | None) -> str | None:
        if name is not None and name not in WRITERS:
            raise ValueError(f"unknown export format {name!r}; choose one of: "
                             f"{', '.join(WRITERS)}")
        return name


class JobLinks(BaseModel):
    self: str
    events: str
    plan: str
    artifact: str


class Job(BaseModel):
    id: str
    status: JobStatus
    model: str
    effective_bits: float = Field(description="The requested budget.")
    formats: list[str] | None
    objective: str
    export_format: str | None
    calibration_texts: int | None = Field(description="Texts given (null: the bundled set).")
    refine_trials: int
    stage: str | None = Field(description="The stage running now (or last run).")
    progress: float = Field(ge=0, le=1)
    message: str | None
    attempts: int = Field(description="Times a worker started this job.")
    cancel_requested: bool
    plan_cache_hit: bool | None = Field(
        description="True when the plan came from the plan cache (null until known).")
    plan_key: str | None
    plan_effective_bits: float | None = Field(description="Effective bits the plan achieved.")
    timings: dict[str, float] = Field(description="Seconds spent in each stage.")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: JobLinks


class JobList(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class Model(BaseModel):
    id: str
    name: str
    size_bytes: int
    files: int
    sha256: str = Field(description="SHA-256 of the uploaded archive.")
    created_at: datetime


class ModelList(BaseModel):
    items: list[Model]
    next_cursor: str | None


class PlanSummary(BaseModel):
    key: str
    architecture: str
    budget: float
    objective: str
    effective_bits: float
    created: str
    hardware: str | None = None


class PlanList(BaseModel):
    items: list[PlanSummary]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Error(BaseModel):
    detail: str
    errors: list[ErrorItem] | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


def timestamp(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None
