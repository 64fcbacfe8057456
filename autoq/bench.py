"""Benchmark: time every candidate format on every recorded shape with the real modules.

Each (format, N, K, M, activation dtype) is timed once, with the module ``quantize_layer`` builds
(the same one the model will run) on the model's device:

- CUDA: median of CUDA-event timings, the L2 cache flushed (a 256 MiB buffer overwritten) before
  every call, so weights are read from memory as they are in a real forward;
- CPU: warm-up calls, then the median of repeated calls. The formats of one shape are timed in
  interleaved rounds, so a burst of load from other processes skews them all alike rather than
  one of them.

**M bucketing.** M (batch x tokens) is rounded up to the next power of two (at least 16) before
timing: calibration batches of slightly different lengths then share one measurement, and the
estimate errs on the slow side. A layer's latency for a format is the sum over its recorded
shapes of ``count x time(bucket(M))``, divided by the number of calibration batches.

Timings live in a table keyed by ``"format|N|K|M|dtype"``; the caller persists it per hardware
key (device name or CPU model, core and thread counts, torch / triton / autoq versions, kernel
backend), so any model with the same shapes reuses it.

**Validity.** Before timing, every candidate is run on the layer's real recorded activations (a
sample from the profile) and compared with the float layer. A format is dropped for that layer,
with the reason kept in the plan, when ``Format.check`` rejects the shape, when quantizing or
running it raises, when its output is not finite, or when its output SQNR is below
``SQNR_FLOOR_DB`` (10 dB: the noise would be a third of the signal's amplitude; a healthy int4
layer measures 15-25 dB, int8 30-45 dB). ``none`` is never dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoq import formats as formats_registry
from autoq.formats import UNQUANTIZED
from autoq.kernels import default_backend, requested_backend
from autoq.primitives import sqnr_db
from autoq.profile import LayerProfile, Profile
from autoq.swap import QuantizedMemo, float_weight, quantized_copy

Report = Callable[[float, str], None]

SQNR_FLOOR_DB = 10.0
MIN_BUCKET = 16


@dataclass
class BenchResult:
    latency: dict[str, dict[str, float]]  # layer -> format -> seconds per calibration batch
    dropped: dict[str, dict[str, str]]  # layer -> format -> reason
    new_timings: dict[str, float]  # timing-table entries measured by this call


def bucket_m(m: int) -> int:
    """The next power of two >= m (at least ``MIN_BUCKET``)."""
    return max(MIN_BUCKET, 1 << max(int(m) - 1, 0).bit_length())


def timing_key(fmt: str, n: int, k: int, m: int, dtype: str) -> str:
    return f"{fmt}|{n}|{k}|{m}|{dtype}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device) -> dict[str, str | int | None]:
    """What the timings depend on: device, software versions and kernel backend."""
    from importlib import metadata

    from autoq import __version__

    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {
        "device": device.type,
        "name": name,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "autoq": __version__,
        "backend": requested_backend() or default_backend(device),
    }


def hardware_key(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- validity


def static_reason(fmt: str, out_features: int, in_features: int, device: torch.device) -> str | None:
    """Why ``fmt`` cannot take a layer of this shape on this device, known before any weight or
    activation is looked at (``None``: it can)."""
    if fmt == UNQUANTIZED:
        return None
    format_ = formats_registry.get(fmt)
    return format_.unsupported_reason(device) or format_.check(out_features, in_features)


def check_layer(module: nn.Module, fmt: str, sample: torch.Tensor | None,
                sqnr_floor: float = SQNR_FLOOR_DB, *, name: str = "",
                quantized: QuantizedMemo | None = None, reference: torch.Tensor | None = None) -> str | None:
    """``None`` when ``fmt`` is usable for this layer, else the reason it is not. ``reference``:
    the float layer's output on ``sample`` when the caller has it (one per layer, not per format)."""
    if fmt == UNQUANTIZED:
        return None
    weight = float_weight(module)
    reason = static_reason(fmt, *weight.shape, weight.device)
    if reason:
        return reason
    try:
        with torch.no_grad():
            qmodule = quantized_copy(module, fmt, name, quantized)
            if sample is None:
                return None
            out = qmodule(sample)
            ref = module(sample) if reference is None else reference
    except Exception as err:  # a kernel that cannot run this layer is dropped, never a crash
        return f"raised {type(err).__name__}: {err}"
    if not torch.isfinite(out).all():
        return "non-finite output on the recorded activations"
    sqnr = sqnr_db(ref, out)
    if sqnr < sqnr_floor:
        return f"output SQNR {sqnr:.1f} dB on the recorded activations is below the {sqnr_floor:g} dB floor"
    return None


def float_output(module: nn.Module, sample: torch.Tensor | None) -> torch.Tensor | None:
    """The float layer's output on ``sample`` (``None`` without one, or when it cannot run)."""
    if sample is None:
        return None
    try:
        with torch.no_grad():
            return module(sample)
    except Exception:  # check_layer reports the failure per format
        return None


# ---------------------------------------------------------------------------------- timing


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    w = weight.detach().to(dtype)
    b = bias.detach().to(dtype) if bias is not None else None
    return lambda x: F.linear(x, w, b)


def _one_call_cpu(fn: Callable, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _one_call_cuda(fn: Callable, x: torch.Tensor, flush: torch.Tensor) -> float:
    flush.zero_()  # evict the weights from L2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_calls(calls: dict, *, rounds: int = 5, per_round: int = 3, budget_s: float = 0.05,
               report: Report | None = None) -> dict:
    """Median seconds per call of each ``calls[key] = (fn, x)``.

    Every callable is warmed up (one call: the module's first call has already chosen its
    kernel path and built its layout), then timed in ``rounds`` interleaved rounds of
    ``per_round`` calls; one with two or more samples adding up to ``budget_s`` is not timed
    again (slow shapes).
    """
    samples: dict = {key: [] for key in calls}
    if not calls:
        return {}
    device = next(iter(calls.values()))[1].device
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    with torch.no_grad():
        for fn, x in calls.values():  # warm-up: first calls build the backend layout and caches
            fn(x)
        if flush is not None:
            torch.cuda.synchronize(device)
        for r in range(rounds):
            for key, (fn, x) in calls.items():
                for _ in range(per_round):
                    if len(samples[key]) >= 2 and sum(samples[key]) > budget_s:
                        break
                    samples[key].append(_one_call_cpu(fn, x) if flush is None else _one_call_cuda(fn, x, flush))
            if report is not None:
                report((r + 1) / rounds, f"timing round {r + 1}/{rounds}")
    return {key: statistics.median(s) for key, s in samples.items()}


# ------------------------------------------------------------------------------- the stage


def benchmark(
    layers: dict[str, nn.Module],
    prof: Profile,
    fmts: Sequence[str],
    *,
    timings: dict[str, float] | None = None,
    sqnr_floor: float = SQNR_FLOOR_DB,
    report: Report | None = None,
    quantized: QuantizedMemo | None = None,
) -> BenchResult:
    """Check every candidate on every layer, time the surviving ones on every recorded shape.

    ``quantized``: a memo of quantized modules by (layer, format), filled here and reused by
    later stages (sensitivity), so each is built once per search."""
    table = dict(timings or {})
    fmts = list(dict.fromkeys([UNQUANTIZED, *fmts]))
    dropped: dict[str, dict[str, str]] = {name: {} for name in layers}
    valid: dict[str, list[str]] = {}
    jobs: dict[tuple[int, int, int, str], ShapeJob] = {}
    for i, (name, module) in enumerate(layers.items()):
        sample = prof.samples.get(name)
        reference = float_output(module, sample)
        for fmt in fmts:
            reason = check_layer(module, fmt, sample, sqnr_floor, name=name, quantized=quantized,
                                 reference=reference)
            if reason:
                dropped[name][fmt] = reason
        valid[name] = [f for f in fmts if f not in dropped[name]]
        add_shape_jobs(jobs, prof.layers[name], module, name, valid[name])
        if report is not None:
            report(0.5 * (i + 1) / len(layers), f"checked {name}")

    def timing_report(fraction: float, message: str) -> None:
        if report is not None:
            report(0.5 + 0.5 * fraction, message)

    new, failed = time_shapes(jobs, table, report=timing_report, quantized=quantized)
    table.update(new)
    latency = layer_latency(prof, valid, table, failed, dropped)
    if report is not None:
        report(1.0, f"{len(jobs)} shapes, {len(new)} timings measured")
    return BenchResult(latency, dropped, new)


@dataclass
class ShapeJob:
    """One (N, K, M bucket, dtype) to time: the formats wanted there and a layer of that shape
    whose weights the timed modules are built from."""

    module: nn.Module
    name: str
    formats: set[str]


def add_shape_jobs(jobs: dict[tuple[int, int, int, str], ShapeJob], layer_prof: LayerProfile,
                   module: nn.Module, name: str, fmts: Sequence[str]) -> None:
    """Add ``fmts`` at every bucketed shape ``layer_prof`` recorded (the first layer of a shape
    provides the weights)."""
    for (m, k), _count in layer_prof.shapes.items():
        key = (layer_prof.out_features, k, bucket_m(m), layer_prof.dtype)
        jobs.setdefault(key, ShapeJob(module, name, set())).formats.update(fmts)


def time_shapes(jobs: dict[tuple[int, int, int, str], ShapeJob], table: dict[str, float], *,
                report: Report | None = None, quantized: QuantizedMemo | None = None
                ) -> tuple[dict[str, float], dict[tuple[int, int, int, str, str], str]]:
    """Time every (shape, format) of ``jobs`` not in ``table`` yet: ``(new timing-table entries,
    {(N, K, M, dtype, format): why it could not be timed})``.

    One weight at a time: its formats are built, timed on all of its M buckets in interleaved
    rounds (so they compare under the same machine load) and freed before the next weight's, so
    memory holds one shape's modules (a 32000-wide head in every format is hundreds of MB)."""
    failed: dict[tuple[int, int, int, str, str], str] = {}
    by_weight: dict[int, list[tuple[tuple[int, int, int, str], ShapeJob, list[str]]]] = {}
    for key, job in jobs.items():
        todo = [f for f in sorted(job.formats) if timing_key(f, *key) not in table]
        if todo:
            by_weight.setdefault(id(job.module), []).append((key, job, todo))
    pairs = sum(len(todo) for group in by_weight.values() for _, _, todo in group)
    if report is not None:
        report(0.0, f"timing {pairs} (format, shape) pairs, {len(jobs)} shapes")
    new: dict[str, float] = {}
    for i, group in enumerate(by_weight.values()):
        module, name = group[0][1].module, group[0][1].name
        weight = float_weight(module).detach()
        fns: dict[str, Callable] = {}
        calls: dict[str, tuple[Callable, torch.Tensor]] = {}
        for (n, k, m, dtype), _job, todo in group:
            x = torch.randn(m, k, device=weight.device).to(getattr(torch, dtype))
            for fmt in todo:
                try:
                    if fmt not in fns:
                        fns[fmt] = (_float_linear(weight, module.bias, x.dtype) if fmt == UNQUANTIZED
                                    else quantized_copy(module, fmt, name, quantized))
                    with torch.no_grad():
                        fns[fmt](x)  # a kernel that fails on this shape is isolated here
                except Exception as err:
                    failed[(n, k, m, dtype, fmt)] = f"timing raised {type(err).__name__}: {err}"
                    continue
                calls[timing_key(fmt, n, k, m, dtype)] = (fns[fmt], x)
        new.update(time_calls(calls))
        del fns, calls
        if report is not None:
            n, k = group[0][0][:2]
            report((i + 1) / len(by_weight), f"timed {n}x{k} ({i + 1}/{len(by_weight)} weights)")
    return new, failed


def layer_latency(prof: Profile, valid: dict[str, list[str]], table: dict[str, float],
                  failed: dict[tuple[int, int, int, str, str], str], dropped: dict[str, dict[str, str]]
                  ) -> dict[str, dict[str, float]]:
    """Each layer's seconds per calibration batch for each of its valid formats, from the timing
    table; a format whose timing failed on one of the layer's shapes is dropped (into ``dropped``)."""
    latency: dict[str, dict[str, float]] = {}
    for name, fmts in valid.items():
        layer_prof = prof.layers[name]
        n = layer_prof.out_features
        latency[name] = {}
        for fmt in fmts:
            total = 0.0
            for (m, k), count in layer_prof.shapes.items():
                key = (n, k, bucket_m(m), layer_prof.dtype, fmt)
                if key in failed:
                    dropped[name][fmt] = failed[key]
                    break
                total += count * table[timing_key(fmt, *key[:4])]
            else:
                latency[name][fmt] = total / max(prof.num_batches, 1)
    return latency


def forward_seconds(models: dict[str, nn.Module], batch, rounds: int = 5,
                    input_dtypes: dict[str, torch.dtype] | None = None) -> dict[str, float]:
    """Median seconds of one whole forward of each model on ``batch`` (interleaved rounds, so a
    noisy machine slows every model alike); ``input_dtypes[name]`` casts float inputs."""
    from autoq.calibration import run_batch, to_device

    calls = {}
    for name, model in models.items():
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        moved = to_device(batch, device)
        if input_dtypes and name in input_dtypes:
            moved = _floats_as(moved, input_dtypes[name])
        probe = torch.empty(0, device=device)
        calls[name] = ((lambda _, m=model, b=moved: run_batch(m, b)), probe)
    return time_calls(calls, rounds=rounds, per_round=2, budget_s=5.0)


def _floats_as(batch, dtype: torch.dtype):
    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    if isinstance(batch, dict):
        return {k: cast(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(cast(v) for v in batch)
    return cast(batch)
