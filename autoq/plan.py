"""The Plan: what the search decided, and every number it decided from, as versioned JSON.

A plan holds, per quantizable layer, the chosen format and the statistics behind it (activation
shapes and how often they occur, timing, sensitivity and storage bits per candidate format, and
the formats dropped with their reasons), plus the model fingerprint, hardware, settings and
totals. Because the statistics travel with the plan, ``autoq.resolve`` can re-solve it for another
budget or objective without the model.

Units: ``latency`` is seconds per calibration batch (the layer's measured time summed over its
recorded shapes, weighted by how often each occurs, divided by the number of batches);
``sensitivity`` is the summed first-order output damage of quantizing that layer alone (see
``autoq.sensitivity``); ``bits`` is storage per weight element including scales.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from autoq.solve import LayerCosts

PLAN_VERSION = 1


class ShapeCount(BaseModel):
    m: int  # rows of the flattened activation (batch x tokens)
    k: int  # in_features
    count: int  # how many calls saw this shape over the calibration batches


class LayerStats(BaseModel):
    """Everything measured about one layer; independent of budget and objective."""

    out_features: int
    in_features: int
    numel: int
    dtype: str  # activation dtype seen during profiling
    shapes: list[ShapeCount] = Field(default_factory=list)
    bits: dict[str, float] = Field(default_factory=dict)
    latency: dict[str, float] = Field(default_factory=dict)
    sensitivity: dict[str, float] = Field(default_factory=dict)
    dropped: dict[str, str] = Field(default_factory=dict)
    methods: dict[str, str] = Field(default_factory=dict)  # format -> "gptq" where not round-to-nearest

    def costs(self) -> LayerCosts:
        candidates = [f for f in self.bits if f in self.latency and f in self.sensitivity]
        return LayerCosts(self.numel, {f: self.bits[f] for f in candidates},
                          {f: self.sensitivity[f] for f in candidates},
                          {f: self.latency[f] for f in candidates})


class LayerPlan(LayerStats):
    format: str
    group: str
    method: str = "rtn"  # how the chosen format's weights were quantized: "rtn" or "gptq"


class ModelInfo(BaseModel):
    architecture: str
    fingerprint: str  # hash of architecture, layer names and shapes, and all weights


class SearchStats(BaseModel):
    """The stage results a plan is solved from: cached apart from plans (see ``autoq.cache``)."""

    version: int = PLAN_VERSION
    autoq_version: str
    model: ModelInfo
    calibration: str  # fingerprint of the calibration batches
    num_batches: int
    hardware: dict[str, str | int | None]
    formats: list[str]
    settings: dict[str, float | int | str | None] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    layers: dict[str, LayerStats]
    notes: list[str] = Field(default_factory=list)

    def costs(self) -> dict[str, LayerCosts]:
        return {name: layer.costs() for name, layer in self.layers.items()}


class Totals(BaseModel):
    effective_bits: float
    latency: float  # predicted seconds per calibration batch, quantizable layers only
    latency_unquantized: float
    speedup: float  # latency_unquantized / latency
    score: float  # predicted total sensitivity of the plan
    size_bytes: int  # storage of the quantizable layers' weights under the plan
    size_bytes_unquantized: int  # the same at 16 bits


class ParetoEntry(BaseModel):
    loss: float
    effective_bits: float
    latency: float
    assignment: dict[str, str]


class Plan(BaseModel):
    version: int = PLAN_VERSION
    autoq_version: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    cache_key: str = ""
    from_cache: bool = Field(default=False, exclude=True)
    model: ModelInfo
    calibration: str
    num_batches: int
    hardware: dict[str, str | int | None]
    formats: list[str]
    budget: float
    objective: str
    groups: list[str]
    settings: dict[str, float | int | str | None] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    layers: dict[str, LayerPlan]
    totals: Totals
    notes: list[str] = Field(default_factory=list)
    pareto: list[ParetoEntry] | None = None

    # ------------------------------------------------------------------------ convenience

    @property
    def effective_bits(self) -> float:
        return self.totals.effective_bits

    def assignment(self) -> dict[str, str]:
        """``{layer name: format}``: what ``autoq.apply`` needs."""
        return {name: layer.format for name, layer in self.layers.items()}

    def methods(self) -> dict[str, str]:
        """``{layer name: "rtn" or "gptq"}``: how each layer's chosen format was quantized."""
        return {name: layer.method for name, layer in self.layers.items()}

    def stats(self) -> SearchStats:
        """The budget-independent statistics this plan was solved from."""
        fields = set(LayerStats.model_fields)
        return SearchStats(
            autoq_version=self.autoq_version, model=self.model, calibration=self.calibration,
            num_batches=self.num_batches, hardware=self.hardware, formats=self.formats,
            settings=self.settings, stage_seconds=self.stage_seconds,
            layers={n: LayerStats(**layer.model_dump(include=fields)) for n, layer in self.layers.items()})

    # ------------------------------------------------------------------------------ JSON

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a plan: invalid JSON ({err})") from None
        if not isinstance(data, dict) or "version" not in data:
            raise ValueError("not a plan: no 'version' field")
        if data["version"] != PLAN_VERSION:
            raise ValueError(f"plan version {data['version']} is not supported (this autoq reads {PLAN_VERSION})")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"not a valid plan: {err.error_count()} problems, first: {err.errors()[0]['msg']} "
                             f"at {'.'.join(map(str, err.errors()[0]['loc']))}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan at {path}")
        return cls.from_json(path.read_text(encoding="utf-8"))

    # --------------------------------------------------------------------------- summary

    def summary(self, width: int | None = None) -> str:
        """A readable table of the plan (rendered with rich, returned as text).

        Without ``width`` the table takes its natural width, so layer names are never cut."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"autoq plan: {self.model.architecture}, objective={self.objective}, "
                            f"budget={self.budget:g} bits", title_justify="left")
        table.add_column("layer", no_wrap=True)
        table.add_column("shape", justify="right")
        table.add_column("format")
        table.add_column("bits", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("method")
        table.add_column("sensitivity", justify="right")
        table.add_column("predicted latency", justify="right")
        table.add_column("vs none", justify="right")
        table.add_column("dropped", overflow="fold")
        for name, layer in self.layers.items():
            fmt = layer.format
            table.add_row(
                name, f"{layer.out_features}x{layer.in_features}", fmt, f"{layer.bits[fmt]:.2f}",
                f"{layer_bytes(layer.numel, layer.bits[fmt]):,}", layer.method, f"{layer.sensitivity[fmt]:.3g}",
                f"{layer.latency[fmt] * 1e6:.0f} us",
                f"{layer.latency['none'] / layer.latency[fmt]:.2f}x" if layer.latency.get(fmt) and "none" in layer.latency
                else "", ", ".join(layer.dropped),
            )
        t = self.totals
        buffer = io.StringIO()
        console = Console(file=buffer, width=width or 10_000, force_terminal=False, color_system=None,
                          soft_wrap=width is None)
        console.print(table)
        console.print(
            f"effective bits {t.effective_bits:.3f} (budget {self.budget:g}) | weights "
            f"{t.size_bytes / 2**20:.2f} MiB vs {t.size_bytes_unquantized / 2**20:.2f} MiB at 16 bits | "
            f"predicted latency {t.latency * 1e3:.2f} ms vs {t.latency_unquantized * 1e3:.2f} ms "
            f"unquantized ({t.speedup:.2f}x) | score {t.score:.4g}")
        reasons: dict[tuple[str, str], list[str]] = {}
        for name, layer in self.layers.items():
            for fmt, reason in layer.dropped.items():
                reasons.setdefault((fmt, reason), []).append(name)
        for (fmt, reason), names in reasons.items():
            where = names[0] if len(names) == 1 else f"{len(names)} layers ({names[0]}, ...)"
            console.print(f"dropped {fmt} for {where}: {reason}")
        for note in self.notes:
            console.print(f"note: {note}")
        return buffer.getvalue()


def layer_bytes(numel: int, bits: float) -> int:
    return int(round(numel * bits / 8))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and ``os.replace``: readers see the old
    file or the new one, never half of one, even with concurrent writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_plan(stats: SearchStats, solution, *, budget: float, objective: str, group_rules: list[str],
               groups: dict[str, str], pareto: list | None = None, notes: list[str] | None = None,
               stage_seconds: dict[str, float] | None = None, cache_key: str = "",
               stats_key: str | None = None) -> Plan:
    """Combine the statistics and a ``solve.Solution`` into a finished Plan: ``stage_seconds``
    (default: the statistics' own), its cache key and the key of the statistics it came from."""
    layers = {}
    size = size_unquantized = 0
    for name, layer in stats.layers.items():
        fmt = solution.assignment[name]
        layers[name] = LayerPlan(**layer.model_dump(), format=fmt, group=groups.get(name, name),
                                 method=layer.methods.get(fmt, "rtn"))
        size += layer_bytes(layer.numel, layer.bits[fmt])
        size_unquantized += layer_bytes(layer.numel, 16.0)
    totals = Totals(
        effective_bits=solution.effective_bits, latency=solution.latency,
        latency_unquantized=solution.latency_unquantized,
        speedup=solution.latency_unquantized / solution.latency if solution.latency > 0 else 1.0,
        score=solution.score, size_bytes=size, size_bytes_unquantized=size_unquantized)
    return Plan(
        autoq_version=stats.autoq_version, model=stats.model, calibration=stats.calibration,
        num_batches=stats.num_batches, hardware=stats.hardware, formats=stats.formats,
        budget=budget, objective=objective, groups=list(group_rules),
        settings={**stats.settings, **({"stats_key": stats_key} if stats_key else {})},
        stage_seconds=dict(stats.stage_seconds if stage_seconds is None else stage_seconds),
        cache_key=cache_key, layers=layers, totals=totals,
        notes=list(solution.notes) + list(stats.notes) + list(notes or []),
        pareto=[ParetoEntry(loss=p.loss, effective_bits=p.effective_bits, latency=p.latency,
                            assignment=p.assignment) for p in pareto] if pareto is not None else None)
