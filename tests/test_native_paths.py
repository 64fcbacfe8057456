"""The native CPU kernels' paths: each matches the format's reference, the ISA decides which are
candidates, and the choice is timed once, cached in memory and on disk."""

from __future__ import annotations

import json

import pytest
import torch

from autoq import formats
from autoq.kernels import cpu, native
from autoq.kernels.cpu import CpuIsa
from autoq.modules import quantize_layer

FORMATS = ["int8_dynamic", "int8_weight_only", "int8_g128", "int4_g32", "int4_g128", "int4_sym_g64"]
FULL_ISA = CpuIsa(avx2=True, avx512=True, avx512_bf16=True, vnni=True, amx_bf16=True, amx_int8=True)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test gets an empty on-disk cache and no in-memory choice."""
    monkeypatch.setenv("AUTOQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cpu.ISA_ENV, raising=False)
    monkeypatch.delenv(native.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(native, "_CACHE", None)


def layer(fmt: str, n: int = 64, k: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    module = quantize_layer(torch.randn(n, k) * 0.05, torch.randn(n) * 0.1, fmt)
    return module, module.format, module.quantized_weight()


def runnable(kernel, prepared, m: int, path: str) -> bool:
    """Whether ``path`` can run here at ``m`` rows: every path but the GEMV runs on any x86 CPU
    (bf16 ops need native bf16 only to be fast); the GEMV needs the compiled library."""
    if path == "gemv":
        return m <= native.GEMV_MAX_M and native.gemv_library() is not None and kernel.gemv_fits(prepared.weight)
    return True


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_every_path_matches_reference(fmt, m):
    _, format_, weight = layer(fmt)
    kernel = type(format_).kernels["native"]
    prepared = kernel.prepare(weight)
    torch.manual_seed(1)
    x = torch.randn(m, weight.in_features)
    bias = torch.randn(weight.out_features) * 0.1
    expected = format_.reference_linear(x, weight, bias)
    for path in kernel.PATHS:
        if not runnable(kernel, prepared, m, path):
            continue
        y = native.with_bias(kernel.run(path, x, prepared), x.dtype, bias)
        assert y.dtype == x.dtype and y.shape == expected.shape
        tol = 2e-2 if "bf16" in path else 1e-4  # bf16 activations round at 2^-8; fp32 paths only in the sums
        err = (y - expected).abs().max() / expected.abs().max()
        assert err < tol, f"{fmt} path {path} at M={m}: relative error {err:.2e}"


@pytest.mark.skipif(native.gemv_library() is None, reason="autoq.kernels._gemv not built")
@pytest.mark.parametrize("fmt", ["int8_weight_only", "int8_g128", "int4_g128", "int8_dynamic"])
@pytest.mark.parametrize("code", [0, 2, 3])
def test_gemv_code_versions_agree(fmt, code, monkeypatch):
    """The portable, AVX2 and AVX-512 versions of gemv.c give the reference's numbers (the
    AVX-512 one only where the CPU has it)."""
    if code == 3 and not cpu.detect_native().avx512 or code == 2 and not cpu.detect_native().avx2:
        pytest.skip("the CPU lacks that ISA")
    monkeypatch.setattr(native, "gemv_isa", lambda isa: code)
    _, format_, weight = layer(fmt, n=48, k=384)
    kernel = type(format_).kernels["native"]
    x = torch.randn(1, 384)
    expected = format_.reference_linear(x, weight, None)
    y = kernel.run("gemv", x, kernel.prepare(weight))
    assert (y - expected).abs().max() / expected.abs().max() < 1e-4


def test_isa_override_caps_features(monkeypatch):
    monkeypatch.setattr(cpu, "detect_native", lambda: FULL_ISA)
    cpu._isa.cache_clear()
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    isa = cpu.cpu_isa()
    assert isa.name == "avx2" and isa.forced == "avx2"
    assert not (isa.avx512 or isa.avx512_bf16 or isa.amx_bf16 or isa.vnni)
    assert not cpu.has_native_bf16()
    monkeypatch.setenv(cpu.ISA_ENV, "avx512_bf16")
    assert cpu.cpu_isa().name == "avx512_bf16" and cpu.has_native_bf16()
    monkeypatch.setenv(cpu.ISA_ENV, "native")
    assert cpu.cpu_isa() == FULL_ISA
    monkeypatch.setenv(cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="AUTOQ_CPU_ISA"):
        cpu.cpu_isa()
    cpu._isa.cache_clear()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 32, 512])
def test_no_bf16_path_under_avx2(fmt, m, monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    _, format_, weight = layer(fmt)
    kernel = type(format_).kernels["native"]
    candidates = kernel.candidates(kernel.prepare(weight), m, cpu.cpu_isa())
    assert candidates and not any("bf16" in path for path in candidates)
    assert kernel.rule_of_thumb(candidates, m, cpu.cpu_isa()) in candidates


def test_int8_groups_have_no_pack_paths(monkeypatch):
    """torch has no packed matmul for grouped int8 scales: the GEMV and the dequant paths only,
    and M=1 still has a path without the compiled library."""
    monkeypatch.setattr(native, "has_native_bf16", lambda: True)
    _, format_, weight = layer("int8_g128")
    kernel = type(format_).kernels["native"]
    prepared = kernel.prepare(weight)
    for m in (1, 3, 40, 512):
        assert not any(path.startswith("pack") for path in kernel.candidates(prepared, m, FULL_ISA))
    monkeypatch.setattr(native, "_GEMV", None)
    assert kernel.candidates(prepared, 1, FULL_ISA) == ["dequant_fp32"]


def test_bf16_paths_offered_with_native_bf16(monkeypatch):
    monkeypatch.setattr(native, "has_native_bf16", lambda: True)
    _, format_, weight = layer("int4_g128")
    kernel = type(format_).kernels["native"]
    prepared = kernel.prepare(weight)
    assert "pack_bf16" in kernel.candidates(prepared, 1, FULL_ISA)
    assert "dequant_bf16" in kernel.candidates(prepared, 512, FULL_ISA)


class CountingTimer:
    def __init__(self):
        self.calls = 0

    def __call__(self, calls):
        self.calls += 1
        return {name: float(i) for i, name in enumerate(calls)}  # the first candidate "wins"


@pytest.mark.parametrize("fmt", ["int8_dynamic", "int8_weight_only", "int8_g128", "int4_g128"])
def test_choice_is_timed_once_and_cached_on_disk(fmt, monkeypatch, tmp_path):
    timer = CountingTimer()
    monkeypatch.setattr(native, "time_paths", timer)
    module, format_, weight = layer(fmt)
    x = torch.randn(32, weight.in_features)
    module(x)
    module(x)
    module(torch.randn(20, weight.in_features))  # same M bucket (32)
    kernel = type(format_).kernels["native"]
    prepared = kernel.prepare(weight)
    candidates = kernel.candidates(prepared, 32, cpu.cpu_isa())
    timed = 1 if len(candidates) > 1 else 0  # a single candidate needs no timing
    assert timer.calls == timed
    # Another layer of the same shape, with a fresh, process-like cache: the choice is read
    # back from disk, no timing.
    monkeypatch.setattr(native, "_CACHE", None)
    assert kernel.choose_path(x, prepared) == candidates[0]
    assert timer.calls == timed
    if timed:
        key = kernel.tuning_key(x, prepared, cpu.cpu_isa())
        assert native.PathCache().get(key) == candidates[0]
        data = json.loads(native.path_cache_file().read_text())
        assert data["entries"][key]["path"] == candidates[0] and data["torch"] == torch.__version__


def test_autotune_off_does_no_timing(monkeypatch):
    timer = CountingTimer()
    monkeypatch.setattr(native, "time_paths", timer)
    monkeypatch.setenv(native.AUTOTUNE_ENV, "0")
    for fmt in FORMATS:
        module, _, weight = layer(fmt)
        for m in (1, 32, 512):
            assert torch.isfinite(module(torch.randn(m, weight.in_features))).all()
    assert timer.calls == 0
    assert not native.path_cache_file().exists()


def test_time_paths_interleaves():
    order: list[str] = []
    times = native.time_paths({"a": lambda: order.append("a"), "b": lambda: order.append("b")})
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert order[:4] == ["a", "b", "a", "b"]


def test_unknown_format_paths_are_covered():
    """Every int format has a native kernel with paths (a new one must declare them)."""
    for name in formats.names():
        fmt = formats.get(name)
        kernel = type(fmt).kernels.get("native")
        if isinstance(kernel, native.PathKernel):
            assert kernel.PATHS


@pytest.mark.parametrize("fmt", ["int8_dynamic", "int8_weight_only", "int8_g128", "int4_g64"])
@pytest.mark.parametrize("whole", [0, 1 << 30])
def test_fp32_dequant_chunked_and_whole_agree_with_reference(fmt, whole, monkeypatch):
    """More rows than one chunk: the chunked loop (``whole=0``) and the whole-weight GEMM."""
    monkeypatch.setattr(native, "DEQUANT_WHOLE_FP32_BYTES", whole)
    _, format_, weight = layer(fmt, n=320, k=128)
    kernel = type(format_).kernels["native"]
    x = torch.randn(24, 128)
    path = "fp32" if fmt == "int8_dynamic" else "dequant_fp32"
    y = kernel.run(path, x, kernel.prepare(weight))
    expected = format_.reference_linear(x, weight, None)
    assert (y - expected).abs().max() / expected.abs().max() < 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_the_compiled_library_every_format_runs(fmt, monkeypatch):
    """No C compiler at install time: no ``gemv`` path, torch's ops (and torch dequantization) only."""
    monkeypatch.setattr(native, "_GEMV", None)
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    module, format_, weight = layer(fmt)
    kernel = type(format_).kernels["native"]
    for m in (1, 3, 40):
        assert "gemv" not in kernel.candidates(kernel.prepare(weight), m, cpu.cpu_isa())
        x = torch.randn(m, weight.in_features)
        expected = format_.reference_linear(x, weight, module.bias)
        assert (module(x) - expected).abs().max() / expected.abs().max() < 1e-4
