"""PyTorch's native quantized CPU ops.

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

import torch

from autoq import primitives as P
from autoq.kernels import QuantizedWeight

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


def supports(family: str, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"native kernels run on CPU, got a {x.device.type} tensor"
    if family == "int4":
        if weight.out_features % 16 != 0:
            return f"_weight_int4pack_mm_for_cpu needs out_features % 16 == 0, got {weight.out_features}"
        if weight.in_features % 2 != 0:
            return f"int4 packing needs even in_features, got {weight.in_features}"
    return None


def prepare(family: str, weight: QuantizedWeight) -> object:
    if family == "int8_dynamic":
        return aligned(weight.qweight), weight.scale.float()
    if family == "int8_weight_only":
        return aligned(weight.qweight), weight.scale.to(torch.bfloat16), weight
    if family == "int4":
        q = P.unpack_int4(weight.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # tinygemm convention: w = (q - 8) * scale + zero, so zero = (8 - zero_point) * scale.
        scale = weight.scale.float()
        zero = (8.0 - weight.zero_point.float()) * scale
        scale_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        return packed, scale_and_zeros, weight.group_size, weight
    raise ValueError(f"unknown kernel family {family!r}")


def linear(family: str, x: torch.Tensor, prepared: object, bias: torch.Tensor | None) -> torch.Tensor:
    if family == "int8_dynamic":
        qweight, wscale = prepared
        xq, xscale = P.quantize_per_token_int8(x)
        y = torch._int_mm(xq, qweight.t()).float()
        y = y.mul_(xscale).mul_(wscale)
        if bias is not None:
            y = y.add_(bias.float())
        return y.to(x.dtype)
    xb = x.to(torch.bfloat16)
    if x.shape[0] >= DEQUANT_GEMM_MIN_M:
        y = dequantize_gemm_bf16(xb, prepared[-1])
    elif family == "int8_weight_only":
        qweight, scale, _ = prepared
        y = torch.ops.aten._weight_int8pack_mm(xb, qweight, scale)
    elif family == "int4":
        packed, scale_and_zeros, group_size, _ = prepared
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scale_and_zeros)
    else:
        raise ValueError(f"unknown kernel family {family!r}")
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def dequantize_gemm_bf16(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """``x @ W.T`` in bf16, dequantizing ``DEQUANT_CHUNK_ROWS`` output rows of W at a time."""
    n = weight.out_features
    if n <= DEQUANT_CHUNK_ROWS:
        return torch.nn.functional.linear(x, dequantize_bf16(weight))
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
    for start in range(0, n, DEQUANT_CHUNK_ROWS):
        rows = slice(start, min(start + DEQUANT_CHUNK_ROWS, n))
        zero_point = None if weight.zero_point is None else weight.zero_point[rows]
        chunk = QuantizedWeight(weight.qweight[rows], weight.scale[rows], zero_point,
                                rows.stop - rows.start, weight.in_features, weight.group_size)
        y[:, rows] = torch.nn.functional.linear(x, dequantize_bf16(chunk))
    return y


def dequantize_bf16(weight: QuantizedWeight) -> torch.Tensor:
    """The weight in bf16, ``[N, K]``: ``q * scale`` (int8) or ``(q - zero_point) * scale`` (int4)."""
    if weight.zero_point is None:
        return weight.qweight.to(torch.bfloat16) * weight.scale.to(torch.bfloat16)[:, None]
    n, g = weight.out_features, weight.group_size
    q = P.unpack_int4(weight.qweight).to(torch.bfloat16).view(n, -1, g)
    zero = weight.zero_point.to(torch.bfloat16).unsqueeze(-1)
    return ((q - zero) * weight.scale.to(torch.bfloat16).unsqueeze(-1)).view(n, -1)
