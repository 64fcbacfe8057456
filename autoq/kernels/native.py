"""The native CPU kernels of the integer formats: several *paths* per format, the fastest chosen
per shape on this CPU.

Paths (``PATHS`` per format; which are candidates depends on the ISA, ``autoq.kernels.cpu``):

- ``gemv`` (M <= 4, AVX2+): our fp32 GEMV (``gemv.c``) streams the int8 / int4 weight once and
  widens it in registers: decode is memory-bound, and this reads 4-8x fewer bytes than fp32.
- ``pack_bf16`` (native bf16 only): ``aten._weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``
  in bf16. Without AVX512-BF16/AMX bf16 is emulated and these lose to fp32.
- ``pack_fp32`` (M = 1, when ``gemv`` is not built): the same ops with fp32 activations, their
  only fp32 form (0.5x fp32 ``F.linear`` here at M=1, 20-60x slower than bf16 from M=32 on).
- ``dequant_bf16`` (native bf16, M >= 16) / ``dequant_fp32`` (M >= 2; M = 1 when nothing else runs): dequantize
  ``DEQUANT_CHUNK_ROWS`` output rows at a time (a chunk stays in cache for its GEMM; fp32: the
  whole weight when small, ``DEQUANT_WHOLE_FP32_BYTES``) and run the float GEMM: for large M the
  GEMM dominates, so this runs at about float GEMM speed.
- int8 in groups (``int8_g128``): torch has no packed op for grouped int8 scales, so only ``gemv``
  (gemv.c's grouped int8 kernel, group % 32 == 0) and the two dequant paths.
- int8_dynamic: ``int_mm`` (per-token int8 activations + ``torch._int_mm``, oneDNN: fast with
  VNNI/AMX, slower than fp32 on plain AVX2), ``gemv`` and ``fp32`` (the same int8 products as an
  fp32 GEMV / GEMM, exact up to fp32 rounding of the int32 sums).

Choice (``choose_path``): per key ``format|activation dtype|M bucket|N|K|group|ISA`` the candidates
are timed once, on first use, interleaved (best of a few rounds in ``TUNE_BUDGET_S``), and the
winner is kept in memory and in ``$AUTOQ_CACHE_DIR/kernels/cpu-<CPU model>.json``.
``AUTOQ_CPU_AUTOTUNE=0`` skips the timing and takes ``rule_of_thumb``'s path. The search's
benchmark stage times the modules, so it sees the path chosen here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoq import primitives as P
from autoq.formats import QuantizedWeight, register_kernel
from autoq.formats.integer import Int4Groups, Int8Dynamic, Int8Groups, Int8WeightOnly
from autoq.kernels.cpu import CpuIsa, cpu_isa, has_native_bf16
from autoq.kernels.tuning import cache_dir, m_bucket

DEQUANT_GEMM_MIN_M = 128  # rule of thumb: from here dequantize + GEMM beats the pack ops (bf16)
# Output rows dequantized at a time on the dequant paths: a chunk's float weight stays in cache for
# its GEMM, which halves the time on Llama-sized weights compared with dequantizing all at once.
DEQUANT_CHUNK_ROWS = 256
# fp32 weights up to this size are dequantized whole, one GEMM: measured on MiniLM shapes
# (AVX2, M=64 and 2048) 1.2-1.6x faster than 256-row chunks, which cost a GEMM call and a copy
# of the output columns each.
DEQUANT_WHOLE_FP32_BYTES = 8 << 20
GEMV_MAX_M = 4  # the GEMV reads the weight once per row of x: past a few rows the GEMM wins
TUNE_BUDGET_S = 0.005  # timing budget per key after one warm-up call per path
TUNE_MIN_ROUNDS, TUNE_MAX_ROUNDS = 5, 25
# Slow calls (a 32000-wide LM head at M=256 takes ~25 ms a path) stop after two rounds once the
# rounds took this long: descheduling only adds time, so the best of two is already the estimate.
TUNE_SLOW_S, TUNE_SLOW_ROUNDS = 0.1, 2
AUTOTUNE_ENV = "AUTOQ_CPU_AUTOTUNE"
CACHE_FORMAT = 1


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` in memory aligned to ``alignment`` bytes (a copy only when it is not).

    The vectorised int8 kernels crash (SIGSEGV) on misaligned weights, and tensors read from a
    safetensors file sit at arbitrary offsets of it.
    """
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def on_cpu(x: torch.Tensor) -> str | None:
    return None if x.device.type == "cpu" else f"native kernels run on CPU, got a {x.device.type} tensor"


def dequantize_gemm(x: torch.Tensor, weight: QuantizedWeight,
                    dequantize: Callable[[QuantizedWeight], torch.Tensor], whole_bytes: int = 0) -> torch.Tensor:
    """``x @ W.T`` in x's dtype, dequantizing ``DEQUANT_CHUNK_ROWS`` output rows of W at a time
    (all of W when it has no more rows, or its float copy no more than ``whole_bytes``)."""
    n = weight.out_features
    if n <= DEQUANT_CHUNK_ROWS or n * weight.in_features * x.element_size() <= whole_bytes:
        return torch.nn.functional.linear(x, dequantize(weight))
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, DEQUANT_CHUNK_ROWS):
        stop = min(start + DEQUANT_CHUNK_ROWS, n)
        y[:, start:stop] = torch.nn.functional.linear(x, dequantize(weight.rows(start, stop)))
    return y


def dequantize_gemm_bf16(x: torch.Tensor, weight: QuantizedWeight,
                         dequantize: Callable[[QuantizedWeight], torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` in bf16 (``x`` and ``dequantize``'s rows are bf16); kept for autoq.kernels.fp8."""
    return dequantize_gemm(x, weight, dequantize)


def with_bias(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(dtype)
    return y if bias is None else y + bias.to(dtype)


# --------------------------------------------------------------------------------------------
# The GEMV library (autoq/kernels/gemv.c, built by `pip install` when a C compiler is present)
# --------------------------------------------------------------------------------------------

_GEMV: ctypes.CDLL | None | bool = False  # False: not looked for yet


def gemv_library() -> ctypes.CDLL | None:
    """The compiled GEMV kernels, or ``None`` when they were not built."""
    global _GEMV
    if _GEMV is False:
        spec = importlib.util.find_spec("autoq.kernels._gemv")
        _GEMV = None
        if spec is not None and spec.origin:
            lib = ctypes.CDLL(spec.origin)  # torch is loaded: its libgomp.so.1 serves this one too
            vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.autoq_gemv_int8.argtypes = [vp, vp, vp, vp, i64, i64, i32, i32]
            lib.autoq_gemv_int4.argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i32, i32]
            lib.autoq_dequant_int8.argtypes = [vp, vp, vp, i64, i64, i32]
            lib.autoq_dequant_int4.argtypes = [vp, vp, vp, vp, i64, i64, i64, i32]
            for fn in (lib.autoq_gemv_int8, lib.autoq_gemv_int4, lib.autoq_dequant_int8, lib.autoq_dequant_int4):
                fn.restype = None
            if hasattr(lib, "autoq_gemv_int8_groups"):  # a library built before int8 groups lacks them
                lib.autoq_gemv_int8_groups.argtypes = [vp, vp, vp, vp, i64, i64, i64, i32, i32]
                lib.autoq_dequant_int8_groups.argtypes = [vp, vp, vp, i64, i64, i64, i32]
                lib.autoq_gemv_int8_groups.restype = lib.autoq_dequant_int8_groups.restype = None
            _GEMV = lib
    return _GEMV


def gemv_isa(isa: CpuIsa) -> int:
    """The code version gemv.c runs: 3 = AVX-512, 2 = AVX2, 0 = none (no ``gemv`` path)."""
    return 3 if isa.avx512 else 2 if isa.avx2 else 0


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ (qweight * scale[:, None]).T`` for ``x`` fp32 ``[M, K]``, one GEMV per row."""
    lib, isa, threads = gemv_library(), gemv_isa(cpu_isa()), torch.get_num_threads()
    assert lib is not None  # isa 0 (portable C) runs too, though never a candidate
    n, k = qweight.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for row in range(x.shape[0]):
        lib.autoq_gemv_int8(x[row].data_ptr(), qweight.data_ptr(), scale.data_ptr(), y[row].data_ptr(),
                            n, k, isa, threads)
    return y


def gemv_int8_groups_library() -> ctypes.CDLL | None:
    """The GEMV library when it has the int8-groups kernels."""
    lib = gemv_library()
    return lib if lib is not None and hasattr(lib, "autoq_gemv_int8_groups") else None


def gemv_int8_groups(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """fp32 ``x @ W.T`` for int8 groups ``W = q * scale[:, k // group_size]`` (scale fp32)."""
    lib, isa, threads = gemv_int8_groups_library(), gemv_isa(cpu_isa()), torch.get_num_threads()
    assert lib is not None
    n, k = qweight.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for row in range(x.shape[0]):
        lib.autoq_gemv_int8_groups(x[row].data_ptr(), qweight.data_ptr(), scale.data_ptr(), y[row].data_ptr(),
                                   n, k, group_size, isa, threads)
    return y


def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """fp32 ``x @ W.T`` for int4 ``W = (q - zero_point) * scale`` (scale fp16, zero_point uint8)."""
    lib, isa, threads = gemv_library(), gemv_isa(cpu_isa()), torch.get_num_threads()
    assert lib is not None  # isa 0 (portable C) runs too, though never a candidate
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for row in range(x.shape[0]):
        lib.autoq_gemv_int4(x[row].data_ptr(), qweight.data_ptr(), scale.data_ptr(), zero_point.data_ptr(),
                            y[row].data_ptr(), n, k, group_size, isa, threads)
    return y


def dequant_int8_fp32(weight: QuantizedWeight) -> torch.Tensor:
    """``qweight * scale[:, None]`` in fp32: one pass in C when built (torch: two)."""
    lib = gemv_library()
    if lib is None:
        return weight.qweight.float() * weight.scale.float()[:, None]
    q, scale = weight.qweight.contiguous(), weight.scale.float().contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    lib.autoq_dequant_int8(q.data_ptr(), scale.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1],
                           torch.get_num_threads())
    return out


def dequant_int8_groups(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per group in ``dtype``, ``[N, K]``: fp32 in one pass in C when built."""
    lib = gemv_int8_groups_library()
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    if dtype != torch.float32 or lib is None:
        return (weight.qweight.to(dtype).view(n, -1, g) * weight.scale.to(dtype).unsqueeze(-1)).view(n, k)
    q, scale = weight.qweight.contiguous(), weight.scale.float().contiguous()
    out = torch.empty(n, k, dtype=torch.float32)
    lib.autoq_dequant_int8_groups(q.data_ptr(), scale.data_ptr(), out.data_ptr(), n, k, g,
                                  torch.get_num_threads())
    return out


def dequant_int4_fp32(weight: QuantizedWeight) -> torch.Tensor | None:
    """``(q - zero_point) * scale`` in fp32 in one pass in C (``None`` when not built; torch takes
    six passes: unpack, cast, subtract, multiply...)."""
    lib = gemv_library()
    if lib is None or weight.group_size % 2:
        return None
    q = weight.qweight.contiguous()
    scale = weight.scale.to(torch.float16).contiguous()
    zero_point = weight.zero_point.to(torch.uint8).contiguous()
    out = torch.empty(weight.out_features, weight.in_features, dtype=torch.float32)
    lib.autoq_dequant_int4(q.data_ptr(), scale.data_ptr(), zero_point.data_ptr(), out.data_ptr(),
                           weight.out_features, weight.in_features, weight.group_size, torch.get_num_threads())
    return out


# --------------------------------------------------------------------------------------------
# The path choice: timing, rule of thumb, cache
# --------------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def path_cache_file() -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", cpu_model_name()).strip("_") or "cpu"
    return cache_dir() / f"cpu-{safe}.json"


class PathCache:
    """The chosen path per key, in memory and on disk (one JSON file per CPU model)."""

    def __init__(self, file: Path | None = None):
        self.file = file or path_cache_file()
        self.chosen: dict[str, str] = {key: entry["path"] for key, entry in self._read().items()
                                       if isinstance(entry, dict) and isinstance(entry.get("path"), str)}

    def _read(self) -> dict:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        if data.get("format") != CACHE_FORMAT or data.get("torch") != torch.__version__:
            return {}  # another torch may have other kernels: choose again
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> str | None:
        return self.chosen.get(key)

    def put(self, key: str, path: str, times_ms: dict[str, float]) -> None:
        """Remember ``path`` for ``key``; rewrite the file atomically, keeping other processes' keys."""
        self.chosen[key] = path
        entries = self._read()
        entries[key] = {"path": path, "ms": {name: round(ms, 4) for name, ms in times_ms.items()}}
        data = {"format": CACHE_FORMAT, "cpu": cpu_model_name(), "torch": torch.__version__,
                "entries": dict(sorted(entries.items()))}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only cache: the choice still holds for this process


_CACHE: PathCache | None = None


def path_cache() -> PathCache:
    global _CACHE
    if _CACHE is None or _CACHE.file != path_cache_file():
        _CACHE = PathCache()
    return _CACHE


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def time_paths(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Fastest milliseconds of each call: one warm-up each, then interleaved rounds (so that a
    noisy neighbour slows every path alike) until ``TUNE_BUDGET_S`` or ``TUNE_MAX_ROUNDS``
    (``TUNE_SLOW_ROUNDS`` for calls slow enough to pass ``TUNE_SLOW_S``).

    The minimum, not the median: on a shared CPU, being descheduled for a time slice (~10 ms)
    only adds time, and in a few-ms window it can hit most of one path's rounds."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for rounds in range(TUNE_MAX_ROUNDS):
        elapsed = time.perf_counter() - start
        if (rounds >= TUNE_MIN_ROUNDS and elapsed > TUNE_BUDGET_S) or (rounds >= TUNE_SLOW_ROUNDS
                                                                       and elapsed > TUNE_SLOW_S):
            break
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) * 1e3 for name, ts in times.items()}


@dataclass
class Prepared:
    """One layer's weight and the path-specific tensors built on first use."""

    weight: QuantizedWeight
    kind: str  # the kernel's name in tuning keys: int8_dynamic, int8_weight_only, int8_groups, int4
    tensors: dict[str, object] = field(default_factory=dict)
    choice: dict[tuple[torch.dtype, int], str] = field(default_factory=dict)  # (dtype, M bucket)

    def get(self, name: str, build: Callable[[], object]) -> object:
        if name not in self.tensors:
            self.tensors[name] = build()
        return self.tensors[name]


class PathKernel:
    """A native kernel with several paths; subclasses say which exist and how each runs."""

    kind = ""
    PATHS: tuple[str, ...] = ()

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        return on_cpu(x)

    def prepare(self, weight: QuantizedWeight) -> Prepared:
        return Prepared(weight, self.kind)

    def gemv_fits(self, weight: QuantizedWeight) -> bool:
        return True

    def candidates(self, prepared: Prepared, m: int, isa: CpuIsa) -> list[str]:
        raise NotImplementedError

    def rule_of_thumb(self, candidates: list[str], m: int, isa: CpuIsa) -> str:
        raise NotImplementedError

    def run(self, path: str, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """``x @ W.T`` (no bias) by ``path``; the result in any float dtype."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
        path = prepared.choice.get((x.dtype, m_bucket(x.shape[0])))
        if path is None:
            path = self.choose_path(x, prepared)
        return with_bias(self.run(path, x, prepared), x.dtype, bias)

    def tuning_key(self, x: torch.Tensor, prepared: Prepared, isa: CpuIsa) -> str:
        w = prepared.weight
        dtype = str(x.dtype).removeprefix("torch.")
        return (f"{self.kind}|{dtype}|m{m_bucket(x.shape[0])}|n{w.out_features}|k{w.in_features}"
                f"|g{w.group_size or 0}|{isa.name}")

    def choose_path(self, x: torch.Tensor, prepared: Prepared) -> str:
        """The path for x's (dtype, M bucket): cached, else timed (or the rule of thumb)."""
        isa = cpu_isa()
        m = x.shape[0]
        candidates = self.candidates(prepared, m, isa)
        key = self.tuning_key(x, prepared, isa)
        cache = path_cache()
        path = cache.get(key)
        if path not in candidates:
            if len(candidates) == 1:
                path = candidates[0]
            elif not autotune_enabled():
                path = self.rule_of_thumb(candidates, m, isa)
            else:
                times = time_paths({name: (lambda name=name: self.run(name, x, prepared)) for name in candidates})
                path = min(times, key=times.__getitem__)
                cache.put(key, path, times)
        prepared.choice[(x.dtype, m_bucket(m))] = path
        return path


def first_of(preferred: tuple[str, ...], candidates: list[str]) -> str:
    return next((p for p in preferred if p in candidates), candidates[0])


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------


@register_kernel("native", Int8Dynamic)
class Int8DynamicNative(PathKernel):
    kind = "int8_dynamic"
    PATHS = ("int_mm", "gemv", "fp32")

    def candidates(self, prepared: Prepared, m: int, isa: CpuIsa) -> list[str]:
        out = ["int_mm"]
        if m <= GEMV_MAX_M and gemv_isa(isa) and gemv_library() is not None:
            out.append("gemv")
        if m >= 2:
            out.append("fp32")
        return out

    def rule_of_thumb(self, candidates: list[str], m: int, isa: CpuIsa) -> str:
        # oneDNN's int8 GEMM is fast only with VNNI / AMX; on plain AVX2 the fp32 forms win.
        if isa.vnni or isa.amx_int8:
            return "int_mm"
        return first_of(("gemv", "fp32") if m == 1 else ("fp32",), candidates)

    def run(self, path: str, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        w = prepared.weight
        qweight = prepared.get("qweight", lambda: aligned(w.qweight))
        wscale = prepared.get("scale", lambda: w.scale.float().contiguous())
        xq, xscale = P.quantize_per_token_int8(x)
        if path == "int_mm":
            # The transposed view of [N, K]: oneDNN reads it in its natural layout, ~9x faster
            # here than a contiguous [K, N] copy.
            y = torch._int_mm(xq, qweight.t()).float().mul_(wscale)
        elif path == "gemv":
            y = gemv_int8(xq.float(), qweight, wscale)
        else:
            y = dequantize_gemm(xq.float(), w, dequant_int8_fp32, DEQUANT_WHOLE_FP32_BYTES)
        return y.mul_(xscale.float())


class WeightOnlyNative(PathKernel):
    """The paths shared by the weight-only formats (see the module docstring)."""

    PATHS = ("gemv", "pack_bf16", "pack_fp32", "dequant_bf16", "dequant_fp32")
    has_pack_op = True  # torch has a packed-weight matmul for this format (the pack_* paths)

    def candidates(self, prepared: Prepared, m: int, isa: CpuIsa) -> list[str]:
        bf16 = has_native_bf16()
        gemv = m <= GEMV_MAX_M and bool(gemv_isa(isa)) and gemv_library() is not None \
            and self.gemv_fits(prepared.weight)
        out = ["gemv"] if gemv else []
        if bf16 and m <= 256 and self.has_pack_op:
            out.append("pack_bf16")
        if m == 1 and not gemv and self.has_pack_op:
            out.append("pack_fp32")
        if bf16 and m >= 16:
            out.append("dequant_bf16")
        if m >= 2 or not out:
            out.append("dequant_fp32")
        return out

    def rule_of_thumb(self, candidates: list[str], m: int, isa: CpuIsa) -> str:
        if m == 1:  # measured: with native bf16 the pack ops, else our fp32 GEMV
            return first_of(("pack_bf16", "gemv", "pack_fp32"), candidates)
        if m < DEQUANT_GEMM_MIN_M:
            return first_of(("pack_bf16", "gemv", "dequant_fp32"), candidates)
        return first_of(("dequant_bf16", "dequant_fp32"), candidates)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def pack_mm(self, x: torch.Tensor, prepared: Prepared, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def gemv(self, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        raise NotImplementedError

    def run(self, path: str, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        if path == "gemv":
            return self.gemv(x.float(), prepared)
        dtype = torch.bfloat16 if path.endswith("bf16") else torch.float32
        if path.startswith("pack"):
            return self.pack_mm(x.to(dtype), prepared, dtype)
        whole = DEQUANT_WHOLE_FP32_BYTES if dtype == torch.float32 else 0
        return dequantize_gemm(x.to(dtype), prepared.weight, lambda part: self.dequantize(part, dtype), whole)


@register_kernel("native", Int8WeightOnly)
class Int8WeightOnlyNative(WeightOnlyNative):
    kind = "int8_weight_only"

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float32:
            return dequant_int8_fp32(weight)
        return weight.qweight.to(dtype) * weight.scale.to(dtype)[:, None]

    def pack_mm(self, x: torch.Tensor, prepared: Prepared, dtype: torch.dtype) -> torch.Tensor:
        w = prepared.weight
        qweight = prepared.get("qweight", lambda: aligned(w.qweight))
        scale = prepared.get(f"scale_{dtype}", lambda: w.scale.to(dtype).contiguous())
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scale)

    def gemv(self, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        w = prepared.weight
        qweight = prepared.get("qweight", lambda: aligned(w.qweight))
        scale = prepared.get("scale_fp32", lambda: w.scale.float().contiguous())
        return gemv_int8(x, qweight, scale)


@register_kernel("native", Int4Groups)
class Int4Native(WeightOnlyNative):
    kind = "int4"

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        if reason := on_cpu(x):
            return reason
        if weight.out_features % 16 != 0:
            return f"_weight_int4pack_mm_for_cpu needs out_features % 16 == 0, got {weight.out_features}"
        if weight.in_features % 2 != 0:
            return f"int4 packing needs even in_features, got {weight.in_features}"
        return None

    def gemv_fits(self, weight: QuantizedWeight) -> bool:
        return weight.group_size % 32 == 0  # gemv.c reads whole 16-byte vectors per group

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        """``(q - zero_point) * scale`` in ``dtype``, ``[N, K]``."""
        if dtype == torch.float32 and (out := dequant_int4_fp32(weight)) is not None:
            return out
        n, g = weight.out_features, weight.group_size
        q = P.unpack_int4(weight.qweight).to(dtype).view(n, -1, g)
        zero = weight.zero_point.to(dtype).unsqueeze(-1)
        return ((q - zero) * weight.scale.to(dtype).unsqueeze(-1)).view(n, -1)

    def pack_mm(self, x: torch.Tensor, prepared: Prepared, dtype: torch.dtype) -> torch.Tensor:
        w = prepared.weight

        def pack() -> torch.Tensor:
            q = P.unpack_int4(w.qweight).to(torch.int32)
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

        def scale_and_zeros() -> torch.Tensor:
            # tinygemm convention: w = (q - 8) * scale + zero, so zero = (8 - zero_point) * scale.
            scale = w.scale.float()
            zero = (8.0 - w.zero_point.float()) * scale
            return torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(dtype)

        packed = prepared.get("int4pack", pack)
        sz = prepared.get(f"scale_and_zeros_{dtype}", scale_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, w.group_size, sz)

    def gemv(self, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        w = prepared.weight
        qweight = prepared.get("qweight", lambda: aligned(w.qweight))
        scale = prepared.get("scale_fp16", lambda: w.scale.to(torch.float16).contiguous())
        zero_point = prepared.get("zero_point", lambda: w.zero_point.to(torch.uint8).contiguous())
        return gemv_int4(x, qweight, scale, zero_point, w.group_size)


@register_kernel("native", Int8Groups)
class Int8GroupsNative(WeightOnlyNative):
    """int8 in groups: torch has no packed matmul for grouped int8 scales, so the paths are our
    GEMV (group % 32 == 0) and dequantize + float GEMM."""

    kind = "int8_groups"
    PATHS = ("gemv", "dequant_bf16", "dequant_fp32")
    has_pack_op = False

    def gemv_fits(self, weight: QuantizedWeight) -> bool:
        return weight.group_size % 32 == 0 and gemv_int8_groups_library() is not None

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return dequant_int8_groups(weight, dtype)

    def gemv(self, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        w = prepared.weight
        qweight = prepared.get("qweight", lambda: aligned(w.qweight))
        scale = prepared.get("scale_fp32", lambda: w.scale.float().contiguous())
        return gemv_int8_groups(x, qweight, scale, w.group_size)
