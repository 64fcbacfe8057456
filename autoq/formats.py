"""The format registry: the one place a quantization format is defined.

A format knows its name, its storage cost in bits per weight element (scales and zero points
included), how to quantize a float weight, and which module runs it. Adding a format touches this
file, a module and a kernel — nothing in the search.

| name             | weight                                  | activations              |
|------------------|-----------------------------------------|--------------------------|
| none             | unchanged (counted as 16 bits)          | unchanged                |
| int8_dynamic     | int8 symmetric per output channel       | int8 per token, dynamic  |
| int8_weight_only | int8 symmetric per output channel       | 16-bit float             |
| int4_g{32,64,128}| uint4 asymmetric per group, 2 per byte  | 16-bit float             |

Checkpoint layouts (``QuantizedWeight`` fields):
- int8 formats: ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``.
- int4 formats: ``qweight`` uint8 ``[N, K // 2]`` (element 2j in the low nibble of byte j),
  ``scale`` fp16 ``[N, K // G]``, ``zero_point`` uint8 ``[N, K // G]`` in ``[0, 15]``;
  ``w ≈ (q - zero_point) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoq import primitives as P
from autoq.kernels import QuantizedWeight


@dataclass(frozen=True)
class Format:
    name: str
    family: str  # "none", "int8_dynamic", "int8_weight_only" or "int4": which kernel runs it
    weight_bits: int
    group_size: int | None = None  # int4 only
    description: str = ""

    @property
    def bits(self) -> float:
        """Nominal bits per weight element, scale overhead included (int8: for in_features=4096)."""
        return self.storage_bits(4096, 4096)

    def storage_bits(self, out_features: int, in_features: int) -> float:
        """Exact bits per weight element of a ``[out_features, in_features]`` weight."""
        if self.family == "none":
            return 16.0
        if self.family == "int4":
            return 4.0 + (16 + 8) / self.group_size  # fp16 scale + uint8 zero point per group
        return 8.0 + 32 / in_features  # fp32 scale per output channel

    def check(self, out_features: int, in_features: int) -> str | None:
        """``None`` when the format can hold a weight of this shape, else the reason it cannot."""
        if self.family == "int4" and in_features % self.group_size != 0:
            return f"in_features={in_features} is not divisible by group size {self.group_size}"
        return None

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize a float weight ``[out_features, in_features]`` into the checkpoint layout."""
        if self.family == "none":
            raise ValueError("format 'none' keeps the float weight; there is nothing to quantize")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        reason = self.check(out_features, in_features)
        if reason:
            raise ValueError(f"cannot quantize a {out_features}x{in_features} weight to {self.name}: {reason}")
        w = weight.detach().float()
        if self.family == "int4":
            q, scale, zero_point = P.quantize_int4_asymmetric(w, self.group_size)
            return QuantizedWeight(
                P.pack_int4(q), scale.to(torch.float16), zero_point, out_features, in_features, self.group_size
            )
        q, scale = P.quantize_int8_symmetric(w, (1, in_features))
        return QuantizedWeight(q, scale.reshape(-1), None, out_features, in_features)


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def all_formats() -> list[Format]:
    return list(_REGISTRY.values())


register(Format("none", "none", 16, description="unquantized"))
register(Format("int8_dynamic", "int8_dynamic", 8, description="W8A8: int8 weights, per-token dynamic int8 activations"))
register(Format("int8_weight_only", "int8_weight_only", 8, description="W8A16: int8 weights, 16-bit activations"))
for _g in (32, 64, 128):
    register(Format(f"int4_g{_g}", "int4", 4, _g, description=f"W4A16: asymmetric uint4, groups of {_g}"))
