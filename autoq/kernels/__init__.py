"""Kernel backends for the quantized formats, and the choice between them.

A kernel implements one format on one backend (the ``Kernel`` protocol of ``autoq.formats.base``:
``supports(weight, x)``, ``prepare(weight)``, ``linear(x, prepared, bias)``). Each backend module
registers its kernels in the formats' tables with ``autoq.formats.register_kernel`` when it is
imported:

- ``native``: PyTorch's own ops (``native.py`` for the integer formats on CPU, ``fp8.py`` for FP8
  on CPU and CUDA);
- ``triton``: our Triton kernels — CUDA, or CPU under ``TRITON_INTERPRET=1`` (``triton_backend.py``);
- ``reference``: the format's own ``reference_linear`` (dequantize, then a float matmul; or the
  exact activation quantization of W8A8). It runs every shape on every device, so every format
  has it.

``AUTOQ_BACKEND`` forces a backend; by default CUDA tensors try ``triton`` then ``native``, and
CPU tensors ``native``: the first backend with a kernel for the format that supports the shape
runs it, else ``reference``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from autoq.formats.base import Format, Kernel, QuantizedWeight

__all__ = ["BACKENDS", "QuantizedWeight", "Selection", "kernel_for", "select_kernel"]

BACKENDS = ("native", "triton", "reference")
_MODULES = {"native": ("autoq.kernels.native", "autoq.kernels.fp8"),
            "triton": ("autoq.kernels.triton_backend",)}


class ReferenceKernel:
    """The ``reference`` backend: the format's own arithmetic."""

    def __init__(self, fmt: Format):
        self.fmt = fmt

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        return None

    def prepare(self, weight: QuantizedWeight) -> QuantizedWeight:
        return weight

    def linear(self, x: torch.Tensor, prepared: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        return self.fmt.reference_linear(x, prepared, bias)


def requested_backend() -> str | None:
    name = os.environ.get("AUTOQ_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"AUTOQ_BACKEND={name!r} is not one of {', '.join(BACKENDS)}; unset it for automatic choice")
    return name


def default_backends(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "native") if triton_available() else ("native",)
    return ("native",)


def default_backend(device: torch.device) -> str:
    """The backend tried first on ``device`` (recorded with the hardware a plan was timed on)."""
    return default_backends(device)[0]


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def load_backend(name: str) -> None:
    """Import a backend module so that its kernels are registered."""
    if name == "reference":
        return
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        for module in _MODULES[name]:
            importlib.import_module(module)
    except ImportError as err:
        if name != "triton":
            raise
        raise RuntimeError(
            f"AUTOQ_BACKEND=triton but the Triton kernels cannot be imported ({err}); "
            "install them with `pip install 'autoq[triton]'`"
        ) from err


def kernel_for(fmt: Format, backend: str) -> Kernel | None:
    """The format's kernel on ``backend`` (``None`` when that backend has none for it)."""
    if backend == "reference":
        return ReferenceKernel(fmt)
    load_backend(backend)
    return type(fmt).kernels.get(backend)


@dataclass(frozen=True)
class Selection:
    backend: str
    kernel: Kernel
    fallback_reason: str | None = None  # why the wanted backend was not used


def select_kernel(fmt: Format, weight: QuantizedWeight, x: torch.Tensor) -> Selection:
    """The kernel that will run ``fmt`` for this weight and input."""
    requested = requested_backend()
    names = (requested,) if requested else default_backends(x.device)
    reasons = []
    for name in names:
        if name == "reference":
            return Selection("reference", ReferenceKernel(fmt))
        kernel = kernel_for(fmt, name)
        reason = f"the {name} backend has no kernel for {fmt.name}" if kernel is None else kernel.supports(weight, x)
        if reason is None:
            return Selection(name, kernel)
        reasons.append(reason)
    return Selection("reference", ReferenceKernel(fmt), "; ".join(reasons))
