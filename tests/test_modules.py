import pytest
import torch
from torch import nn

from autoq import formats
from autoq.kernels import ReferenceKernel
from autoq.modules import QuantizedLinear, quantize_layer

QUANTIZED = [f for f in formats.names() if f != "none"]
# Relative error of the module vs F.linear with its own dequantized weight. The native weight-only
# kernels compute in bf16 and int8_dynamic also rounds the activations, hence the looser bounds.
TOLERANCE = {"int8_dynamic": 2e-2, "int8_weight_only": 1e-2, "int8_g128": 1e-2, "int4_g32": 1e-2, "int4_g64": 1e-2, "int4_g128": 1e-2,
             "int4_sym_g32": 1e-2, "int4_sym_g64": 1e-2, "int4_sym_g128": 1e-2,
             "fp8_e4m3_weight_only": 1e-2, "fp8_e4m3_dynamic": 4e-2}


def rel_err(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_dequantized_reference(fmt, dtype, bias):
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=bias)
    q = quantize_layer(layer.weight, layer.bias, fmt)
    x = torch.randn(2, 3, 256).to(dtype)  # leading batch dims
    y = q(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    ref = torch.nn.functional.linear(x.float(), q.dequantize(), None if layer.bias is None else layer.bias.float())
    assert rel_err(y, ref) < TOLERANCE[fmt] + (8e-3 if dtype != torch.float32 else 0)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_native_and_reference_backends_agree(fmt, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(128, 48)
    q = quantize_layer(layer.weight, layer.bias, fmt)
    x = torch.randn(17, 128)
    assert q.backend_for(x) == "native"
    native = q(x)
    monkeypatch.setenv("AUTOQ_BACKEND", "reference")
    reference = q(x)
    assert rel_err(native, reference) < TOLERANCE[fmt]


def test_int4_native_needs_n_multiple_of_16_and_falls_back_to_reference():
    layer = nn.Linear(64, 24)
    q = quantize_layer(layer.weight, layer.bias, "int4_g32")
    x = torch.randn(4, 64)
    assert q.backend_for(x) == "reference"
    assert torch.isfinite(q(x)).all()


def test_int8_dynamic_is_exact_integer_arithmetic():
    torch.manual_seed(0)
    layer = nn.Linear(96, 40, bias=False)
    q = quantize_layer(layer.weight, None, "int8_dynamic")
    x = torch.randn(5, 96)
    from autoq import primitives as P

    xq, xs = P.quantize_per_token_int8(x)
    expected = (xq.double() @ q.qweight.double().t()) * xs.double() * q.scale.double()
    assert torch.allclose(q(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_bad_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AUTOQ_BACKEND", "cuda-magic")
    q = quantize_layer(torch.randn(16, 32), None, "int8_dynamic")
    with pytest.raises(ValueError, match="not one of native, triton, reference"):
        q(torch.randn(2, 32))


def test_wrong_input_width_is_a_clear_error():
    q = quantize_layer(torch.randn(16, 32), None, "int8_weight_only")
    with pytest.raises(ValueError, match="expects last dim 32"):
        q(torch.randn(2, 31))


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("fmt, max_ratio", [
    ("int8_dynamic", 0.26), ("int8_weight_only", 0.26),
    ("int8_g128", 0.26),  # an fp32 scale per 128 weights: 8.25 bits = 0.258 of fp32
    # g32 keeps an fp16 scale and a uint8 zero point per 32 weights: 4.75 bits = 0.148 of fp32.
    ("int4_g32", 0.15), ("int4_g64", 0.14), ("int4_g128", 0.14),
])
def test_state_dict_bytes_reflect_the_format(fmt, max_ratio):
    w = torch.randn(1024, 1024)
    q = quantize_layer(w, None, fmt)
    ratio = state_bytes(q) / (w.numel() * 4)
    assert ratio <= max_ratio
    bits = formats.get(fmt).storage_bits(1024, 1024)
    assert state_bytes(q) == pytest.approx(w.numel() * bits / 8, rel=1e-6)


def test_int4_g128_of_4096_square_is_about_8_5_mb():
    q = QuantizedLinear(4096, 4096, False, "int4_g128", device="meta")
    size = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert 8.3e6 < size < 8.9e6


def test_meta_construction_and_format_check():
    m = QuantizedLinear(32, 16, True, "int8_dynamic", device="meta")
    assert m.qweight.device.type == "meta" and m.qweight.dtype == torch.int8
    assert not hasattr(m, "zero_point")
    with pytest.raises(ValueError, match="not divisible by group size 128"):
        QuantizedLinear(96, 16, False, "int4_g128")
    with pytest.raises(ValueError, match="no quantized module"):
        QuantizedLinear(32, 16, False, "none")


def test_module_is_not_dequantize_then_matmul_on_cpu(monkeypatch):
    """Natively supported shapes run the native kernels: the reference path is never taken."""
    calls = []
    monkeypatch.setattr(ReferenceKernel, "linear", lambda self, *a: calls.append(self.fmt.name))
    monkeypatch.setattr(type(formats.get("int4_g32")), "dequantize",
                        lambda *a, **k: calls.append("dequantize"))
    for fmt in QUANTIZED:
        q = quantize_layer(torch.randn(64, 128), torch.randn(64), fmt)
        x = torch.randn(3, 128)
        assert q.backend_for(x) == "native", fmt
        y = q(x)
        assert y.shape == (3, 64) and torch.isfinite(y).all()
    assert calls == []


def test_unknown_format_names_valid_ones():
    with pytest.raises(ValueError, match="valid formats: none, int8_dynamic"):
        formats.get("int3")


def test_format_bits():
    assert formats.get("none").bits == 16
    assert formats.get("int4_g128").bits == pytest.approx(4.1875)
    assert formats.get("int4_g32").bits == pytest.approx(4.75)
    assert formats.get("int8_g128").bits == pytest.approx(8.25)
    assert formats.get("int8_dynamic").storage_bits(384, 384) == pytest.approx(8 + 32 / 384)


@pytest.mark.parametrize("fmt", ["int8_dynamic", "int8_weight_only"])
def test_misaligned_weights_run(fmt):
    """Tensors loaded from safetensors can sit at any byte offset; the native kernels need 64."""
    q = quantize_layer(torch.randn(64, 128), None, fmt)
    buffer = torch.empty(64 * 128 + 64, dtype=torch.int8)
    view = buffer[1:1 + 64 * 128].view(64, 128)
    view.copy_(q.qweight)
    q.qweight = view
    x = torch.randn(20, 128)
    assert torch.isfinite(q(x)).all()


@pytest.mark.parametrize("fmt", ["int8_weight_only", "int4_g64"])
def test_large_m_dequantize_gemm_path_agrees_with_small_m_kernel(fmt):
    """Weight-only formats switch kernels at DEQUANT_GEMM_MIN_M rows; both give the same numbers."""
    from autoq.kernels.native import DEQUANT_GEMM_MIN_M

    torch.manual_seed(0)
    q = quantize_layer(torch.randn(320, 128), torch.randn(320), fmt)  # > one dequantized chunk
    x = torch.randn(DEQUANT_GEMM_MIN_M, 128)
    large = q(x)
    small = torch.cat([q(chunk) for chunk in x.split(DEQUANT_GEMM_MIN_M // 4)])
    assert rel_err(large, small) < 1e-2


def test_prepare_builds_the_kernel_layout_before_the_first_forward(monkeypatch):
    q = quantize_layer(torch.randn(64, 128), None, "int8_weight_only")
    q.prepare(torch.float32, rows=3)
    assert len(q._prepared) == 1
    calls = []
    kernel, _ = q._kernel_for(torch.empty(3, 128))
    monkeypatch.setattr(type(kernel), "prepare", lambda self, w: calls.append(1))
    assert q(torch.randn(3, 128)).shape == (3, 64)
    assert calls == []  # forward only looked the layout up
