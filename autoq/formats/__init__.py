"""The format registry: the one place the available quantization formats are listed.

| name             | weight                                  | activations              |
|------------------|-----------------------------------------|--------------------------|
| none             | unchanged (counted as 16 bits)          | unchanged                |
| int8_dynamic     | int8 symmetric per output channel       | int8 per token, dynamic  |
| int8_weight_only | int8 symmetric per output channel       | 16-bit float             |
| int8_g128        | int8 symmetric per group of 128         | 16-bit float             |
| int4_g{32,64,128}| uint4 asymmetric per group, 2 per byte  | 16-bit float             |
| int4_sym_g{32,64,128} | int4 symmetric per group (no zero point) | 16-bit float        |
| fp8_e4m3_weight_only | float8 e4m3 per output channel      | 16-bit float             |
| fp8_e4m3_dynamic | float8 e4m3 per output channel          | float8 per token, dynamic|

Each format is one object (``autoq.formats.base.Format``) that owns its bits, quantizer,
module buffers, kernels and checkpoint scheme. Adding a format: define it (a ``Format``
subclass, e.g. in a new module here), register an instance below, and register its kernels in
``autoq/kernels/`` with ``register_kernel``; nothing in the search, solver, plan, cache, CLI or
service changes (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from autoq.formats.base import Format, Kernel, QuantizedWeight, Unquantized, register_kernel
from autoq.formats.fp8 import Fp8Dynamic, Fp8WeightOnly
from autoq.formats.integer import Int4Groups, Int8Dynamic, Int8Groups, Int8WeightOnly

__all__ = ["Format", "Kernel", "QuantizedWeight", "all_formats", "get", "names", "register",
           "register_kernel"]

UNQUANTIZED = "none"

_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def all_formats() -> list[Format]:
    return list(_REGISTRY.values())


register(Unquantized(UNQUANTIZED, "unquantized"))
register(Int8Dynamic("int8_dynamic", "W8A8: int8 weights, per-token dynamic int8 activations"))
register(Int8WeightOnly("int8_weight_only", "W8A16: int8 weights, 16-bit activations"))
# Opt-in: 0.17 bits more than int8 per channel for little gain (MiniLM uniform held-out cosine
# 0.9998 vs 0.9996); there to read and write llm-compressor's W8A16 preset.
register(Int8Groups("int8_g128", "W8A16: symmetric int8, groups of 128 (llm-compressor's W8A16 preset)", 128,
                    default_candidate=False))
for _g in (32, 64, 128):
    register(Int4Groups(f"int4_g{_g}", f"W4A16: asymmetric uint4, groups of {_g}", _g))
for _g in (32, 64, 128):
    register(Int4Groups(f"int4_sym_g{_g}", f"W4A16: symmetric int4, groups of {_g}", _g, symmetric=True))
register(Fp8WeightOnly("fp8_e4m3_weight_only", "W8A16-FP8: float8 e4m3 weights, 16-bit activations"))
register(Fp8Dynamic("fp8_e4m3_dynamic", "W8A8-FP8: float8 e4m3 weights, per-token dynamic float8 activations"))
