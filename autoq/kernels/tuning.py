"""Block configurations for the Triton kernels: candidates, tuning and the on-disk cache.

A configuration names the kernel (``"gemv"``, ``"mm"`` or ``"dequant"`` = dequantize + cuBLAS)
and its block sizes. Which paths and tiles exist depends on the Triton kernel's
:class:`Traits` (weight-only or not, its GEMV tiles). The best one is chosen per key
``kernel | activation dtype | M bucket | N | K | group size`` by timing every candidate with
``triton.testing.do_bench`` (which flushes L2 between runs) — our own loop rather than
``@triton.autotune``, whose multi-config form cannot run without a GPU.

Choices are persisted per GPU model as JSON in ``$AUTOQ_CACHE_DIR/kernels/<gpu>.json`` (default
cache dir: ``platformdirs.user_cache_dir("autoq")``)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "triton": "3.9.0",
     "entries": {"int4|bfloat16|m1|n4096|k14336|g128":
                 {"kernel": "gemv", "block_m": 1, "block_n": 128, "block_k": 256, "split_k": 4,
                  "group_m": 1, "num_warps": 4, "num_stages": 2, "ms": 0.0123}}}

so a new process does not re-tune. A file written by another Triton version is ignored.
Without CUDA, under ``TRITON_INTERPRET=1``, every shape uses one fixed configuration
(:func:`fixed_config`); ``AUTOQ_AUTOTUNE=0`` skips the timing on CUDA and uses
:func:`default_config`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

CACHE_FORMAT = 1
M_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
KERNELS = ("gemv", "mm", "dequant")


@dataclass(frozen=True)
class Traits:
    """What the tuner needs to know about one Triton kernel."""

    name: str  # the tuning-cache namespace, e.g. "int4"
    weight_only: bool  # float activations: the GEMV and dequantize + cuBLAS paths exist
    grouped: bool = False  # scales per group of the input dimension (a GROUP_SIZE constexpr)
    gemv_tiles: tuple[tuple[int, int], ...] = ()  # (block_n, block_k) candidates for M = 1
    default_gemv_block_n: int = 32
    default_gemv_block_k: int = 256


@dataclass(frozen=True)
class KernelConfig:
    kernel: str  # "gemv", "mm" or "dequant"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KernelConfig:
        names = {f.name for f in fields(cls)}
        config = cls(**{key: value for key, value in data.items() if key in names})
        if config.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {config.kernel!r} in a cached config")
        return config


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the last bucket holds every larger M)."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def tuning_key(traits: Traits, dtype: torch.dtype, m: int, n: int, k: int,
               group_size: int | None) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{traits.name}|{dtype_name}|m{m_bucket(m)}|n{n}|k{k}|g{group_size or 0}"


def _gemv(block_n: int, block_k: int, split_k: int, num_warps: int = 4) -> KernelConfig:
    return KernelConfig("gemv", 1, block_n, block_k, split_k, 1, num_warps, 2)


def _mm(block_m: int, block_n: int, block_k: int, split_k: int = 1, num_warps: int = 4,
        num_stages: int = 4, group_m: int = 8) -> KernelConfig:
    return KernelConfig("mm", block_m, block_n, block_k, split_k, group_m, num_warps, num_stages)


DEQUANT = KernelConfig("dequant", 0, 0, 0, 1, 0, 0, 0)


def fixed_config(traits: Traits, m: int) -> KernelConfig:
    """The one configuration per path used without CUDA (interpreter): small blocks, and
    split-K on the small-M paths so that the tests exercise it."""
    if m == 1 and traits.weight_only:
        return _gemv(32, 64, 2)
    if m <= 16:
        return _mm(16, 32, 32, split_k=2)
    return _mm(32, 32, 32, group_m=4)


GEMV_PROGRAMS = 256  # programs an M = 1 GEMV wants in flight (~2 per SM of an H100 / H200)


def gemv_split(n: int, k: int, block_n: int, block_k: int) -> int:
    """Split-K of the default M = 1 GEMV: none when the N blocks alone give GEMV_PROGRAMS
    programs (each program then stores its columns of y directly, no atomics); else the
    smallest split that does, among those whose slices are whole tiles."""
    columns = -(-n // block_n)
    best = 1
    for split in (1, 2, 4, 8):
        if split > 1 and k % (block_k * split):
            continue
        best = split
        if columns * split >= GEMV_PROGRAMS:
            break
    return best


def default_config(traits: Traits, m: int, n: int, k: int, group_size: int | None,
                   dtype: torch.dtype | None = None) -> KernelConfig:
    """A reasonable CUDA configuration when tuning is disabled.

    fp32 activations take fp32 ("ieee") dots, which Triton computes with FMAs in registers:
    smaller tiles, so that they do not spill (``python -m autoq.kernels.aot`` checks)."""
    bk_limit = group_size or 256
    if m == 1 and traits.weight_only:
        block_n, block_k = traits.default_gemv_block_n, traits.default_gemv_block_k
        if dtype == torch.float32:  # the plain fp32 GEMV keeps a [BLOCK_N, BLOCK_K] accumulator
            block_n, block_k = 32, 256
        return _gemv(block_n, block_k, gemv_split(n, k, block_n, block_k))
    if dtype == torch.float32 and traits.weight_only:
        if m <= 16:
            return _mm(16, 64, 32, split_k=4 if k >= 4096 else 1, num_stages=3)
        if m <= 64:
            return _mm(32, 64, 32, num_stages=3)
        return _mm(64, 64, 32, num_warps=8, num_stages=3)
    if m <= 16:
        return _mm(16, 64, min(128, bk_limit), split_k=4 if k >= 4096 else 1)
    if m <= 64:
        return _mm(64, 64, min(64, bk_limit))
    return _mm(128, 128, min(64, bk_limit), num_warps=8, num_stages=3)


def candidates(traits: Traits, m: int, k: int, group_size: int | None) -> list[KernelConfig]:
    """Configurations timed for one M bucket (CUDA only)."""
    bucket = m_bucket(m)
    weight_only = traits.weight_only
    bk_limit = group_size or 256  # an int4 GEMM tile stays inside one group
    out: list[KernelConfig] = []

    def splits(block_k: int, options: tuple[int, ...]) -> list[int]:
        return [s for s in options if s == 1 or k >= 2 * s * block_k]

    if weight_only and bucket == 1:  # M = 2..16: the GEMM reads the weight once, not M times
        tiles = traits.gemv_tiles
        for block_n, block_k in tiles:
            for split_k in splits(block_k, (1, 2, 4, 8)):
                out.append(_gemv(block_n, block_k, split_k))
        out.append(_gemv(tiles[2][0], tiles[2][1], 4, num_warps=8))
    if bucket <= 16:
        for block_n, block_k in [(32, 128), (64, 64), (64, 128), (128, 64), (64, 256)]:
            block_k = min(block_k, bk_limit)
            for split_k in splits(block_k, (1, 2, 4, 8)):
                out.append(_mm(16, block_n, block_k, split_k))
    elif bucket <= 64:
        for block_m in (32, 64):
            for block_n in (64, 128):
                for block_k in (min(64, bk_limit), min(128, bk_limit)):
                    for split_k in splits(block_k, (1, 2, 4)):
                        out.append(_mm(block_m, block_n, block_k, split_k))
    else:
        for bm, bn, bk, warps, stages in [
            (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
            (64, 128, 32, 4, 4), (128, 128, 32, 4, 4), (128, 256, 32, 8, 4),
        ]:
            if bk <= bk_limit:
                out.append(_mm(bm, bn, bk, num_warps=warps, num_stages=stages))
        if not weight_only:  # int8 activations, one byte per operand element: deeper K tiles fit
            out += [_mm(128, 256, 128, num_warps=8, num_stages=3),
                    _mm(256, 128, 128, num_warps=8, num_stages=3)]
        if bucket <= 256:
            out.append(_mm(64, 128, min(64, bk_limit), split_k=2))
    if weight_only and bucket >= 64:
        out.append(DEQUANT)
    return list(dict.fromkeys(out))  # clamping block_k to the group size can repeat configs


# --------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("AUTOQ_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("autoq")
    return Path(root) / "kernels"


def cache_path(device_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") or "gpu"
    return cache_dir() / f"{safe}.json"


def _triton_version() -> str:
    import triton

    return triton.__version__


def load_cache(device_name: str) -> dict[str, dict]:
    """Cached entries for this GPU model (empty if none, unreadable or from another Triton)."""
    path = cache_path(device_name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("format") != CACHE_FORMAT or data.get("triton") != _triton_version():
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def save_entry(device_name: str, key: str, entry: dict) -> None:
    """Add one entry to the file, keeping what other processes wrote meanwhile."""
    path = cache_path(device_name)
    entries = load_cache(device_name)
    entries[key] = entry
    data = {"format": CACHE_FORMAT, "device": device_name, "triton": _triton_version(),
            "entries": dict(sorted(entries.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Tuner:
    """Chooses and remembers the fastest configuration per key for one GPU model."""

    def __init__(self, device_name: str):
        self.device_name = device_name
        self.chosen: dict[str, KernelConfig] = {}
        for key, entry in load_cache(device_name).items():
            try:
                self.chosen[key] = KernelConfig.from_dict(entry)
            except (TypeError, ValueError):
                continue  # an entry from an incompatible version: tune it again

    def get(self, key: str) -> KernelConfig | None:
        return self.chosen.get(key)

    def tune(self, key: str, configs: list[KernelConfig],
             time_ms: Callable[[KernelConfig], float]) -> KernelConfig:
        """Time every configuration, remember (and persist) the fastest for ``key``.

        Configurations that do not fit the GPU (``OutOfResources``: too much shared memory or
        too many registers) are skipped.
        """
        from triton.runtime.errors import OutOfResources

        best: tuple[float, KernelConfig] | None = None
        for config in configs:
            try:
                ms = time_ms(config)
            except OutOfResources:
                continue
            if best is None or ms < best[0]:
                best = (ms, config)
        if best is None:
            raise RuntimeError(f"no kernel configuration could run for {key}")
        self.chosen[key] = best[1]
        save_entry(self.device_name, key, {**best[1].to_dict(), "ms": round(best[0], 6)})
        return best[1]


_TUNERS: dict[str, Tuner] = {}


def tuner_for(device: torch.device) -> Tuner:
    name = torch.cuda.get_device_name(device)
    if name not in _TUNERS:
        _TUNERS[name] = Tuner(name)
    return _TUNERS[name]


def autotune_enabled() -> bool:
    return os.environ.get("AUTOQ_AUTOTUNE", "1").strip() not in ("0", "false", "no")
