"""One ``nn.Module`` per quantized format, made from a float layer.

Each stores only the quantized tensors (checkpoint layout, see ``autoq.formats``) plus the bias,
accepts any leading batch dimensions and fp32/fp16/bf16 activations, and runs the kernel chosen by
``autoq.kernels.select_backend``. The backend's own weight layout is built on first use per
(backend, device) and cached on the module (not in the ``state_dict``).
"""

from __future__ import annotations

import torch
from torch import nn

from autoq import formats
from autoq.kernels import QuantizedWeight, backend_module, select_backend


class QuantizedLinear(nn.Module):
    """Base class: buffers ``qweight``, ``scale`` (and ``zero_point`` for int4) and ``bias``."""

    family: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, format_name: str,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format_name = format_name
        self.format = formats.get(format_name)
        reason = self.format.check(out_features, in_features)
        if reason:
            raise ValueError(f"{format_name} cannot hold a {out_features}x{in_features} layer: {reason}")
        for name, (shape, dtype) in self._buffer_specs().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._prepared: dict[tuple, object] = {}

    def _buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, format_name: str,
                    quantized: QuantizedWeight | None = None) -> QuantizedLinear:
        """Build from a float weight ``[out, in]`` (``quantized`` reuses an already-quantized one)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, format_name, device=weight.device,
                     bias_dtype=bias.dtype if bias is not None else torch.float32)
        q = quantized if quantized is not None else module.format.quantize(weight)
        module.qweight = q.qweight
        module.scale = q.scale
        if q.zero_point is not None:
            module.zero_point = q.zero_point
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale, getattr(self, "zero_point", None),
                               self.out_features, self.in_features, self.format.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from autoq.kernels.reference import dequantize_weight

        return dequantize_weight(self.quantized_weight(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects last dim {self.in_features}, got input of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        weight = self.quantized_weight()
        backend = select_backend(self.family, weight, x2d)
        key = (backend, x2d.device)
        prepared = self._prepared.get(key)
        kernels = backend_module(backend)
        if prepared is None:
            prepared = self._prepared[key] = kernels.prepare(self.family, weight)
        y = kernels.linear(self.family, x2d, prepared, self.bias)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        self._prepared = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format={self.format_name}"


class Int8DynamicLinear(QuantizedLinear):
    """W8A8: int8 weight per output channel, activations quantized per token at run time."""

    family = "int8_dynamic"

    def _buffer_specs(self):
        return {"qweight": ((self.out_features, self.in_features), torch.int8),
                "scale": ((self.out_features,), torch.float32)}


class Int8WeightOnlyLinear(QuantizedLinear):
    """W8A16: int8 weight per output channel, 16-bit activations."""

    family = "int8_weight_only"

    def _buffer_specs(self):
        return {"qweight": ((self.out_features, self.in_features), torch.int8),
                "scale": ((self.out_features,), torch.float32)}


class Int4Linear(QuantizedLinear):
    """W4A16: asymmetric uint4 per group of the input dimension, packed two per byte."""

    family = "int4"

    def _buffer_specs(self):
        groups = self.in_features // self.format.group_size
        return {"qweight": ((self.out_features, self.in_features // 2), torch.uint8),
                "scale": ((self.out_features, groups), torch.float16),
                "zero_point": ((self.out_features, groups), torch.uint8)}


MODULE_FOR_FAMILY: dict[str, type[QuantizedLinear]] = {
    "int8_dynamic": Int8DynamicLinear,
    "int8_weight_only": Int8WeightOnlyLinear,
    "int4": Int4Linear,
}


def module_class(format_name: str) -> type[QuantizedLinear]:
    fmt = formats.get(format_name)
    if fmt.family == "none":
        raise ValueError("format 'none' has no quantized module: the float layer stays")
    return MODULE_FOR_FAMILY[fmt.family]


def quantize_layer(weight: torch.Tensor, bias: torch.Tensor | None, format_name: str,
                   quantized: QuantizedWeight | None = None) -> QuantizedLinear:
    """A quantized module for a float weight ``[out, in]`` and optional bias."""
    return module_class(format_name).from_weight(weight, bias, format_name, quantized)
