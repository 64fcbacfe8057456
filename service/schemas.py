"""Request and response models of the HTTP API."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from autoq import formats as format_registry
from autoq.checkpoint import WRITERS
from autoq.config import METHODS
from autoq.models import BUNDLED
from autoq.solve import OBJECTIVES

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
EventKind = Literal["status", "stage", "progress"]
# The schema lists exactly the values the handlers accept (an enum each).
FormatName = Literal[tuple(format_registry.names())]  # type: ignore[valid-type]
Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]
ExportFormat = Literal[tuple(WRITERS)]  # type: ignore[valid-type]
Method = Literal[METHODS]  # type: ignore[valid-type]

JOB_ID = r"^job_[0-9a-f]{32}$"
MODEL_ID = r"^mdl_[0-9a-f]{32}$"
# A bundled model, an uploaded model id, or an absolute path (no control characters).
MODEL_SPEC = (r"^(" + "|".join(re.escape(name) for name in BUNDLED)
              + r"|mdl_[0-9a-f]{32}|/[^\x00-\x1f\x7f]{0,4094})$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Text = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]


class Calibration(Strict):
    texts: list[Text] = Field(
        min_length=1, max_length=4096,
        description="Sentences the model is run on while searching (default: autoq's bundled set).",
    )


class JobCreate(Strict):
    model: str = Field(
        min_length=1, max_length=4095, pattern=MODEL_SPEC,
        description="An uploaded model id (mdl_...), a bundled model (bundled:minilm), or an "
                    "absolute directory under the server's model roots.",
        examples=["bundled:minilm"],
    )
    effective_bits: float = Field(
        ge=2, le=16, allow_inf_nan=False,
        description="Budget: average bits per weight over the quantized layers, in [2, 16].",
    )
    formats: list[FormatName] | None = Field(
        None, min_length=1, max_length=32, json_schema_extra={"uniqueItems": True},
        description="Candidate formats, each at most once (default: every format whose export "
                    "every loader reads, i.e. all but the asymmetric int4_g*). See autoq.formats.",
    )
    objective: Objective = Field("balanced", description=f"One of: {', '.join(OBJECTIVES)}.")
    calibration: Calibration | None = None
    refine_trials: int = Field(
        0, ge=0, le=200,
        description="Trials of the optional refinement stage (measured loss on held-out "
                    "calibration batches); 0 skips it.",
    )
    method: Method = Field("rtn", description=(
        "How weights are quantized: rtn (round to nearest), gptq (calibrated on the job's "
        "calibration texts) or auto (per layer and format, whichever scores lower)."))
    export_format: ExportFormat | None = Field(None, description=(
        "Checkpoint format: compressed-tensors or autoq (default: compressed-tensors when the "
        "model can be expressed in it, else autoq)."))

    # The "before" validators give the errors a clearer message than the enum's own.

    @field_validator("model", mode="before")
    @classmethod
    def _model_spec(cls, spec: Any) -> Any:
        if not isinstance(spec, str) or re.fullmatch(MODEL_SPEC, spec):
            return spec
        if spec.startswith("bundled:"):
            raise ValueError(f"unknown bundled model {spec[:100]!r}; available: "
                             f"{', '.join(BUNDLED)}")
        if spec.startswith("mdl_"):
            raise ValueError(f"{spec[:100]!r} is not a valid model id (mdl_ and 32 hex digits)")
        if spec.startswith("/"):
            raise ValueError("the model path is too long or contains control characters")
        raise ValueError(f"unknown model {spec[:200]!r}: give an uploaded model id (mdl_...), a "
                         f"bundled model ({', '.join(BUNDLED)}) or an absolute directory under "
                         f"the server's model roots")

    @field_validator("refine_trials", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        # JSON Schema counts 3.0 as an integer; strict mode still refuses true and "3".
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("formats", mode="before")
    @classmethod
    def _known_formats(cls, names: Any) -> Any:
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return names
        valid = format_registry.names()
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; "
                             f"valid formats: {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise ValueError("formats lists a format more than once")
        return names

    @field_validator("objective", mode="before")
    @classmethod
    def _known_objective(cls, objective: Any) -> Any:
        if isinstance(objective, str) and objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of: "
                             f"{', '.join(OBJECTIVES)}")
        return objective

    @field_validator("export_format", mode="before")
    @classmethod
    def _known_export_format(cls, name: Any) -> Any:
        if isinstance(name, str) and name not in WRITERS:
            raise ValueError(f"unknown export format {name!r}; choose one of: "
                             f"{', '.join(WRITERS)}")
        return name


class JobLinks(BaseModel):
    self: str
    events: str
    plan: str
    report: str
    artifact: str


class Job(BaseModel):
    id: str
    status: JobStatus
    model: str
    effective_bits: float = Field(description="The requested budget.")
    formats: list[str] | None
    objective: Objective
    export_format: ExportFormat | None
    calibration_texts: int | None = Field(description="Texts given (null: the bundled set).")
    refine_trials: int = Field(ge=0)
    stage: str | None = Field(description="The stage running now (or last run).")
    progress: float = Field(ge=0, le=1)
    message: str | None
    attempts: int = Field(ge=0, description="Times a worker started this job.")
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


class JobEventData(BaseModel):
    """The JSON ``data`` of one server-sent event of ``GET /v1/jobs/{job_id}/events``."""

    status: JobStatus
    message: str | None = None
    stage: str | None = None
    progress: float | None = Field(None, ge=0, le=1)
    error: str | None = None
    at: float = Field(description="When it happened (seconds since the epoch).")


def event_stream_schema() -> dict[str, Any]:
    """One server-sent event as the stream sends it (OpenAPI 3.1: ``schema`` is one event)."""
    data = JobEventData.model_json_schema()
    data.pop("title", None)
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": list(EventKind.__args__)},
            "id": {"type": "string", "pattern": r"^[0-9]+$"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": data},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


class Model(BaseModel):
    id: str
    name: str
    size_bytes: int = Field(ge=0)
    files: int = Field(ge=0)
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
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


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
