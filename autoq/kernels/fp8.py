"""FP8 kernels on PyTorch's own ops (the ``native`` backend), CPU and CUDA.

- CUDA (compute capability 8.9+): W8A8-FP8 quantizes each token to e4m3 and runs
  ``torch._scaled_mm`` (FP8 tensor cores, fp32 accumulation) with the per-token and per-channel
  scales applied in its epilogue. W8A16-FP8 dequantizes into the activation dtype and runs
  cuBLAS (one extra pass over the weight; there is no mixed fp8 x bf16 matmul in torch).
- CPU: no FP8 arithmetic, but every e4m3 value is exact in bf16 (3 mantissa bits vs 7), so the
  products of a bf16 GEMM over the converted operands are exact in its fp32 accumulator.
  W8A16-FP8 converts ``DEQUANT_CHUNK_ROWS`` output rows at a time (cache-sized) and runs the
  bf16 GEMM (measured here to beat ``torch._scaled_mm``'s CPU fallback, about 1.6x at
  4096x4096); W8A8-FP8 runs the chunks as an fp32 GEMM so its result is not rounded to bf16
  before the scales.
"""

from __future__ import annotations

import torch

from autoq import primitives as P
from autoq.formats import QuantizedWeight, register_kernel
from autoq.formats.fp8 import FP8_MIN_CAPABILITY, Fp8Dynamic, Fp8WeightOnly
from autoq.kernels.native import DEQUANT_CHUNK_ROWS, dequantize_gemm_bf16, with_bias


def fp8_bf16(weight: QuantizedWeight) -> torch.Tensor:
    """The stored e4m3 values in bf16 (exact), without the scale."""
    return weight.qweight.to(torch.bfloat16)


def dequantize_bf16(weight: QuantizedWeight) -> torch.Tensor:
    return fp8_bf16(weight) * weight.scale.to(torch.bfloat16)[:, None]


def check_device(x: torch.Tensor) -> str | None:
    if x.device.type == "cpu":
        return None
    if x.device.type != "cuda":
        return f"FP8 kernels run on CPU or CUDA, got a {x.device.type} tensor"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < FP8_MIN_CAPABILITY:
        return f"torch._scaled_mm needs compute capability 8.9+, this GPU is sm_{capability[0]}{capability[1]}"
    return None


@register_kernel("native", Fp8WeightOnly)
class Fp8WeightOnlyNative:
    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        return check_device(x)

    def prepare(self, weight: QuantizedWeight) -> QuantizedWeight:
        return weight

    def linear(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type == "cuda":
            w = weight.qweight.to(x.dtype) * weight.scale.to(x.dtype)[:, None]
            return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
        y = dequantize_gemm_bf16(x.to(torch.bfloat16), weight, dequantize_bf16)
        return with_bias(y, x.dtype, bias)


@register_kernel("native", Fp8Dynamic)
class Fp8DynamicNative:
    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        if reason := check_device(x):
            return reason
        if x.device.type == "cuda" and (weight.in_features % 16 or weight.out_features % 16):
            return f"torch._scaled_mm needs in/out features divisible by 16, got {weight.in_features}/{weight.out_features}"
        return None

    def prepare(self, weight: QuantizedWeight):
        return weight, weight.scale.float().reshape(1, -1)

    def linear(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        weight, wscale = prepared
        xq, xscale = P.quantize_per_token_fp8(x)
        if x.device.type == "cuda":
            return torch._scaled_mm(xq, weight.qweight.t(), scale_a=xscale, scale_b=wscale,
                                    bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
        # fp32 GEMM: a bf16 product would round before the scales, and the next layer's FP8
        # rounding magnifies that (2.8e-2 vs 6e-6 relative error on a Llama against the reference).
        acc = torch.cat([torch.nn.functional.linear(xq.float(), weight.rows(start, min(start + DEQUANT_CHUNK_ROWS,
                                                                                      weight.out_features)).qweight.float())
                         for start in range(0, weight.out_features, DEQUANT_CHUNK_ROWS)], dim=1)
        y = acc.mul_(xscale).mul_(wscale)
        if bias is not None:
            y = y.add_(bias.float())
        return y.to(x.dtype)
