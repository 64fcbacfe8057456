"""The quantized Linear module: one class for every format, made from a float layer.

A :class:`QuantizedLinear` stores only its format's quantized tensors (``Format.tensor_specs``)
plus the bias, accepts any leading batch dimensions and fp32/fp16/bf16 activations, and runs the
kernel ``autoq.kernels.select_kernel`` picks for the input. The kernel's own weight layout is
built on first use per (backend, device) and cached on the module (not in the ``state_dict``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from autoq import formats
from autoq.formats import QuantizedWeight
from autoq.kernels import select_kernel


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in a quantized format."""

    def __init__(self, in_features: int, out_features: int, bias: bool, format_name: str,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format_name = format_name
        self.format = formats.get(format_name)
        if not self.format.quantized:
            raise ValueError(f"format {format_name!r} has no quantized module: the float layer stays")
        reason = self.format.check(out_features, in_features)
        if reason:
            raise ValueError(f"{format_name} cannot hold a {out_features}x{in_features} layer: {reason}")
        for name, (shape, dtype) in self.format.tensor_specs(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._prepared: dict[tuple, object] = {}  # (backend, device) -> the kernel's weight layout
        self._chosen: dict[tuple, tuple] = {}  # (device, dtype, M size class, AUTOQ_BACKEND) -> kernel

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, format_name: str,
                    quantized: QuantizedWeight | None = None) -> QuantizedLinear:
        """Build from a float weight ``[out, in]`` (``quantized`` reuses an already-quantized one)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, format_name, device=weight.device,
                     bias_dtype=bias.dtype if bias is not None else torch.float32)
        q = quantized if quantized is not None else module.format.quantize(weight)
        stored = q.tensors()
        for name in module.format.tensor_specs(out_features, in_features):
            setattr(module, name, stored[name])
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def quantized_weight(self) -> QuantizedWeight:
        return self.format.weight_from_tensors(dict(self.named_buffers(recurse=False)),
                                               self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self.quantized_weight(), dtype)

    def backend_for(self, x: torch.Tensor) -> str:
        """The backend that runs this layer for input ``x`` (any leading dimensions)."""
        return select_kernel(self.format, self.quantized_weight(), x.reshape(-1, self.in_features)).backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects last dim {self.in_features}, got input of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        kernel, prepared = self._kernel_for(x2d)
        y = kernel.linear(x2d, prepared, self.bias)
        return y.reshape(*lead, self.out_features)

    def prepare(self, dtype: torch.dtype = torch.bfloat16, rows: int = 1) -> None:
        """Build (and on CUDA tune) the kernel's weight layout for ``dtype`` inputs now, so that
        ``forward`` only looks it up: nothing synchronises, and it can be captured in a CUDA
        graph. Called on ``.to()`` onto a CUDA device."""
        device = self.qweight.device
        if device.type != "meta":
            self._kernel_for(torch.empty(rows, self.in_features, dtype=dtype, device=device))

    def _kernel_for(self, x2d: torch.Tensor) -> tuple:
        # The choice depends on device, dtype, the size of M and AUTOQ_BACKEND only, so it is
        # made once per such key: a forward costs a dict lookup, not a dispatch.
        key = (x2d.device, x2d.dtype, max(x2d.shape[0], 1).bit_length(), os.environ.get("AUTOQ_BACKEND"))
        chosen = self._chosen.get(key)
        if chosen is None:
            weight = self.quantized_weight()
            selection = select_kernel(self.format, weight, x2d)
            prepared_key = (selection.backend, x2d.device)
            if prepared_key not in self._prepared:
                self._prepared[prepared_key] = selection.kernel.prepare(weight)
            chosen = self._chosen[key] = (selection.kernel, self._prepared[prepared_key])
        return chosen

    def _apply(self, fn, recurse=True):
        self._prepared, self._chosen = {}, {}
        module = super()._apply(fn, recurse)
        if self.qweight.device.type == "cuda":
            self.prepare()
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared, self._chosen = {}, {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format={self.format_name}"


def quantize_layer(weight: torch.Tensor, bias: torch.Tensor | None, format_name: str,
                   quantized: QuantizedWeight | None = None) -> QuantizedLinear:
    """A quantized module for a float weight ``[out, in]`` and optional bias."""
    return QuantizedLinear.from_weight(weight, bias, format_name, quantized)
