"""The on-disk cache: plans, the statistics they were solved from, and kernel timings.

Layout under the cache directory (``cache_dir=``, else ``$AUTOQ_CACHE_DIR``, else the per-user
cache directory from platformdirs)::

    plans/<plan key>.json     a Plan (key: statistics key + budget, objective, groups, refinement)
    stats/<stats key>.json    SearchStats (key: model and calibration fingerprints, formats,
                              excluded layers, loss, scoring settings, hardware, autoq version)
    timings/<hardware>.json   {"format|N|K|M|dtype": seconds}, shared by every model
    refine.db                 optuna's SQLite storage for refinement studies

A plan hit skips every stage; a statistics hit (same model and data, new budget or objective)
skips profiling, benchmarking and scoring and only re-solves.

Every write goes to a temporary file in the same directory and is moved into place with
``os.replace``, so concurrent processes never see half a file. Two processes adding timings at
once can lose one's additions (the last writer wins); that only costs re-timing later. A file
that cannot be read back is reported with a warning, removed, and rebuilt by the next search.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from autoq.plan import Plan, SearchStats, atomic_write_text


def default_cache_dir() -> Path:
    env = os.environ.get("AUTOQ_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("autoq"))


def make_key(*parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def model_fingerprint(model: nn.Module, layer_shapes: dict[str, tuple[int, int]]) -> str:
    """Hash of the architecture, the quantizable layers' names and shapes, and every weight."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(json.dumps(sorted((n, list(s)) for n, s in layer_shapes.items())).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


class PlanCache:
    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    # ------------------------------------------------------------------------------ plans

    def _plan_path(self, key: str) -> Path:
        return self.root / "plans" / f"{key}.json"

    def get(self, key: str) -> Plan | None:
        """The cached plan for ``key``; ``None`` when absent or corrupt (corrupt: warned, removed)."""
        path = self._plan_path(key)
        text = self._read(path)
        if text is None:
            return None
        try:
            plan = Plan.from_json(text)
        except ValueError as err:
            self._corrupt(path, err)
            return None
        plan.cache_key = key
        return plan

    def put(self, plan: Plan) -> None:
        if not plan.cache_key:
            raise ValueError("the plan has no cache_key")
        atomic_write_text(self._plan_path(plan.cache_key), plan.to_json())

    def list(self) -> list[dict]:
        """One summary per cached plan, newest first."""
        entries = []
        for path in sorted((self.root / "plans").glob("*.json")):
            try:
                plan = Plan.from_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            entries.append({"key": path.stem, "architecture": plan.model.architecture,
                            "budget": plan.budget, "objective": plan.objective,
                            "effective_bits": plan.effective_bits, "created": plan.created,
                            "hardware": plan.hardware.get("name")})
        return sorted(entries, key=lambda e: e["created"], reverse=True)

    # ------------------------------------------------------------------------- statistics

    def get_stats(self, key: str) -> SearchStats | None:
        path = self.root / "stats" / f"{key}.json"
        text = self._read(path)
        if text is None:
            return None
        try:
            return SearchStats.model_validate_json(text)
        except ValidationError as err:
            self._corrupt(path, err)
            return None

    def put_stats(self, key: str, stats: SearchStats) -> None:
        atomic_write_text(self.root / "stats" / f"{key}.json", stats.model_dump_json())

    # ---------------------------------------------------------------------------- timings

    def timings(self, hardware_key: str) -> dict[str, float]:
        path = self.root / "timings" / f"{hardware_key}.json"
        text = self._read(path)
        if text is None:
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
                raise ValueError("expected an object of numbers")
        except ValueError as err:
            self._corrupt(path, err)
            return {}
        return {str(k): float(v) for k, v in data.items()}

    def add_timings(self, hardware_key: str, new: dict[str, float]) -> None:
        if not new:
            return
        merged = {**self.timings(hardware_key), **new}
        atomic_write_text(self.root / "timings" / f"{hardware_key}.json", json.dumps(merged, indent=0))

    # --------------------------------------------------------------------------- studies

    def study_storage(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.root / 'refine.db').resolve()}"

    # --------------------------------------------------------------------------- helpers

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            PlanCache._corrupt(path, err)
            return None

    @staticmethod
    def _corrupt(path: Path, err: Exception) -> None:
        warnings.warn(f"autoq cache entry {path} is unreadable ({str(err).splitlines()[0]}); "
                      "removing it, it will be rebuilt", stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass
