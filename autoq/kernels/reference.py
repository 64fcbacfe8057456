"""Reference backend: dequantize, then a float matmul. Runs every shape on every device.

It defines the numbers the fast backends are tested against (int8_dynamic quantizes the
activations exactly as the fast paths do, and accumulates exactly in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoq import primitives as P
from autoq.kernels import QuantizedWeight


def dequantize_weight(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if weight.zero_point is None:  # int8 symmetric per output channel
        return (weight.qweight.float() * weight.scale.float()[:, None]).to(dtype)
    q = P.unpack_int4(weight.qweight)
    return P.dequantize_affine(q, (1, weight.group_size), weight.scale, weight.zero_point, dtype)


def supports(family: str, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
    return None


def prepare(family: str, weight: QuantizedWeight) -> object:
    return weight


def linear(family: str, x: torch.Tensor, prepared: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if family == "int8_dynamic":
        xq, xs = P.quantize_per_token_int8(x)
        acc = xq.double() @ prepared.qweight.double().t()
        y = (acc * xs.double() * prepared.scale.double()[None, :]).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    w = dequantize_weight(prepared, torch.float32)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
