"""The format objects: each owns its storage, arithmetic, kernels and checkpoint scheme."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from autoq import bench, formats
from autoq.kernels import BACKENDS, kernel_for

ROOT = Path(__file__).resolve().parents[1]
QUANTIZED = [f for f in formats.all_formats() if f.quantized]


def test_no_dispatch_on_format_kind_outside_the_format_definitions():
    """A new format must not need edits elsewhere: nothing outside autoq/formats/ asks what kind
    of format it has (no 'family' attribute, no comparison with a family or format-name prefix)."""
    pattern = re.compile(r"\.family\b|[=!]=\s*[\"'](int4|int8|fp8)|startswith\([\"'](int|fp)")
    offenders = []
    for path in [*ROOT.glob("autoq/**/*.py"), *ROOT.glob("service/**/*.py")]:
        if path.is_relative_to(ROOT / "autoq" / "formats"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_formats_layer_does_not_import_kernels_or_modules():
    for path in (ROOT / "autoq" / "formats").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(autoq\.\w+)", path.read_text(), re.M)
        assert not {"autoq.kernels", "autoq.modules"} & set(imports), path.name


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_every_format_is_complete(fmt):
    """Storage that matches its bits, a round trip, a scheme it accepts back, a native kernel."""
    n, k = 64, 256
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q = fmt.quantize(weight)
    specs = fmt.tensor_specs(n, k)
    stored = {name: t for name, t in q.tensors().items() if name in specs}  # others are implied
    assert {name: (tuple(t.shape), t.dtype) for name, t in stored.items()} == specs
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in stored.values())
    assert stored_bits == pytest.approx(fmt.storage_bits(n, k) * n * k)
    assert (fmt.dequantize(q) - weight).norm() / weight.norm() < 0.15
    scheme = fmt.ct_scheme()
    from autoq.checkpoint.compressed_tensors import _args_with_defaults

    weights, acts = _args_with_defaults(scheme["weights"]), _args_with_defaults(scheme["input_activations"])
    assert [f.name for f in QUANTIZED if f.ct_accepts(weights, acts)] == [fmt.name]
    assert kernel_for(fmt, "native") is not None
    assert set(BACKENDS) >= {"native", "reference"}


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        formats.get("fp4")
    with pytest.raises(ValueError, match="nothing to quantize"):
        formats.get("none").quantize(torch.randn(4, 4))


def test_fp8_reports_itself_unsupported_on_gpus_without_fp8(monkeypatch):
    fmt = formats.get("fp8_e4m3_dynamic")
    assert fmt.unsupported_reason(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "8.9" in fmt.unsupported_reason(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fmt.unsupported_reason(torch.device("cuda")) is None
    assert formats.get("int4_g128").unsupported_reason(torch.device("cuda")) is None


def test_search_drops_a_format_its_device_cannot_run(monkeypatch):
    fmt = formats.get("fp8_e4m3_weight_only")
    monkeypatch.setattr(type(fmt), "unsupported_reason", lambda self, device: "no FP8 here")
    layer = nn.Linear(64, 32)
    assert bench.check_layer(layer, fmt.name, torch.randn(4, 64)) == "no FP8 here"
    assert bench.check_layer(layer, "int8_weight_only", torch.randn(4, 64)) is None


@pytest.mark.parametrize("name", ["fp8_e4m3_weight_only", "fp8_e4m3_dynamic"])
def test_fp8_kernels_match_reference(name, monkeypatch):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(1)
    q = fmt.quantize(torch.randn(48, 320, generator=g))
    x, bias = torch.randn(7, 320, generator=g), torch.randn(48, generator=g)
    kernel = kernel_for(fmt, "native")
    y = kernel.linear(x, kernel.prepare(q), bias)
    expected = fmt.reference_linear(x, q, bias)
    assert y.dtype == x.dtype and y.shape == (7, 48)
    # bf16 GEMM output (CPU) vs the float64 reference: a few bf16 ulps.
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("fmt", [f for f in formats.names() if formats.get(f).quantized])
def test_quantizing_in_row_chunks_gives_the_whole_weights_result(fmt, monkeypatch):
    """Large weights are quantized a chunk of rows at a time (bounded temporaries); the stored
    tensors must be exactly those of quantizing the weight in one go."""
    from autoq.formats import base

    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    whole = formats.get(fmt).quantize(weight)
    monkeypatch.setattr(base, "QUANTIZE_CHUNK_ELEMENTS", 256 * 7)  # 7 rows per chunk: uneven split
    chunked = formats.get(fmt).quantize(weight)
    assert chunked.out_features == 96 and chunked.in_features == 256
    assert whole.tensors().keys() == chunked.tensors().keys()
    for key, tensor in whole.tensors().items():
        assert torch.equal(tensor, chunked.tensors()[key]), key
