"""PyTorch's native quantized CPU ops, one kernel per format.

- int8_dynamic: per-token int8 activations, ``torch._int_mm`` (int32 accumulation), scales and
  bias applied after. The weight is passed as the transposed view of ``[N, K]``: oneDNN then
  reads it in its natural layout, ~9x faster than a contiguous ``[K, N]`` copy here.
- int8_weight_only / int4: ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``
  compute in bf16 (W8A16 / W4A16: 16-bit activations). On CPUs these kernels are 20-60x slower
  with fp32 or fp16 inputs than with bf16, so every input is cast to bf16 and the result back.
- Those two kernels are tuned for small M. From ``DEQUANT_GEMM_MIN_M`` rows on, dequantizing the
  weight to bf16 on the fly and running the bf16 GEMM is 2-8x faster here (measured on MiniLM and
  Llama shapes, see bench/results/formats-cpu.md), so weight-only formats switch to it there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from autoq import primitives as P
from autoq.formats import QuantizedWeight, register_kernel
from autoq.formats.integer import Int4Groups, Int8Dynamic, Int8WeightOnly

DEQUANT_GEMM_MIN_M = 128
# Output rows dequantized at a time on that path: a chunk's bf16 weight stays in cache for its
# GEMM, which halves the time on Llama-sized weights compared with dequantizing all at once.
DEQUANT_CHUNK_ROWS = 256


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` in memory aligned to ``alignment`` bytes (a copy only when it is not).

    The vectorised int8 kernels crash (SIGSEGV) on misaligned weights, and tensors read from a
    safetensors file sit at arbitrary offsets of it.
    """
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def on_cpu(x: torch.Tensor) -> str | None:
    return None if x.device.type == "cpu" else f"native kernels run on CPU, got a {x.device.type} tensor"


def dequantize_gemm_bf16(x: torch.Tensor, weight: QuantizedWeight,
                         dequantize: Callable[[QuantizedWeight], torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` in bf16, dequantizing ``DEQUANT_CHUNK_ROWS`` output rows of W at a time."""
    n = weight.out_features
    if n <= DEQUANT_CHUNK_ROWS:
        return torch.nn.functional.linear(x, dequantize(weight))
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
    for start in range(0, n, DEQUANT_CHUNK_ROWS):
        stop = min(start + DEQUANT_CHUNK_ROWS, n)
        y[:, start:stop] = torch.nn.functional.linear(x, dequantize(weight.rows(start, stop)))
    return y


def with_bias(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(dtype)
    return y if bias is None else y + bias.to(dtype)


@register_kernel("native", Int8Dynamic)
class Int8DynamicNative:
    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        return on_cpu(x)

    def prepare(self, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        return aligned(weight.qweight), weight.scale.float()

    def linear(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        qweight, wscale = prepared
        xq, xscale = P.quantize_per_token_int8(x)
        y = torch._int_mm(xq, qweight.t()).float()
        y = y.mul_(xscale).mul_(wscale)
        if bias is not None:
            y = y.add_(bias.float())
        return y.to(x.dtype)


@register_kernel("native", Int8WeightOnly)
class Int8WeightOnlyNative:
    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        return on_cpu(x)

    def prepare(self, weight: QuantizedWeight):
        return aligned(weight.qweight), weight.scale.to(torch.bfloat16), weight

    @staticmethod
    def dequantize_bf16(weight: QuantizedWeight) -> torch.Tensor:
        return weight.qweight.to(torch.bfloat16) * weight.scale.to(torch.bfloat16)[:, None]

    def linear(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        qweight, scale, weight = prepared
        xb = x.to(torch.bfloat16)
        if x.shape[0] >= DEQUANT_GEMM_MIN_M:
            y = dequantize_gemm_bf16(xb, weight, self.dequantize_bf16)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, qweight, scale)
        return with_bias(y, x.dtype, bias)


@register_kernel("native", Int4Groups)
class Int4Native:
    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        if reason := on_cpu(x):
            return reason
        if weight.out_features % 16 != 0:
            return f"_weight_int4pack_mm_for_cpu needs out_features % 16 == 0, got {weight.out_features}"
        if weight.in_features % 2 != 0:
            return f"int4 packing needs even in_features, got {weight.in_features}"
        return None

    def prepare(self, weight: QuantizedWeight):
        q = P.unpack_int4(weight.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # tinygemm convention: w = (q - 8) * scale + zero, so zero = (8 - zero_point) * scale.
        scale = weight.scale.float()
        zero = (8.0 - weight.zero_point.float()) * scale
        scale_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        return packed, scale_and_zeros, weight

    @staticmethod
    def dequantize_bf16(weight: QuantizedWeight) -> torch.Tensor:
        """``(q - zero_point) * scale`` in bf16, ``[N, K]``."""
        n, g = weight.out_features, weight.group_size
        q = P.unpack_int4(weight.qweight).to(torch.bfloat16).view(n, -1, g)
        zero = weight.zero_point.to(torch.bfloat16).unsqueeze(-1)
        return ((q - zero) * weight.scale.to(torch.bfloat16).unsqueeze(-1)).view(n, -1)

    def linear(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        packed, scale_and_zeros, weight = prepared
        xb = x.to(torch.bfloat16)
        if x.shape[0] >= DEQUANT_GEMM_MIN_M:
            y = dequantize_gemm_bf16(xb, weight, self.dequantize_bf16)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, weight.group_size, scale_and_zeros)
        return with_bias(y, x.dtype, bias)
