"""Kernel backends for the quantized Linear formats, and the dispatch between them.

Every backend implements the same three functions over plain tensors (see ``reference.py``):

- ``supports(family, weight, x) -> str | None`` — ``None`` when it can run, else why not;
- ``prepare(family, weight) -> object`` — convert the checkpoint layout into the backend's own
  layout, once per device (the module caches the result);
- ``linear(family, x, prepared, bias) -> Tensor`` — ``x`` is 2-D ``[M, K]``; the result is
  ``[M, N]`` in ``x.dtype``.

``family`` is ``"int8_dynamic"``, ``"int8_weight_only"`` or ``"int4"``; ``weight`` is a
:class:`QuantizedWeight` in the checkpoint layout.

Backends: ``native`` (PyTorch's quantized CPU ops), ``triton`` (our kernels; CUDA, or CPU under
``TRITON_INTERPRET=1``), ``reference`` (dequantize, then a float matmul). ``AUTOQ_BACKEND``
forces one; by default CUDA tensors use ``triton`` and CPU tensors ``native``. A forced or default
backend that cannot run a given shape falls back to ``reference``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("native", "triton", "reference")


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight in the checkpoint layout (see ``autoq.formats`` for each format's)."""

    qweight: torch.Tensor  # int8 [N, K], or uint8 [N, K // 2] with two int4 values per byte
    scale: torch.Tensor  # fp32 [N] (int8 formats) or fp16 [N, K // group_size] (int4)
    zero_point: torch.Tensor | None  # uint8 [N, K // group_size] (int4) or None
    out_features: int
    in_features: int
    group_size: int | None = None


def requested_backend() -> str | None:
    name = os.environ.get("AUTOQ_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"AUTOQ_BACKEND={name!r} is not one of {', '.join(BACKENDS)}; unset it for automatic choice")
    return name


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    return "native"


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def backend_module(name: str) -> ModuleType:
    if name == "native":
        from autoq.kernels import native

        return native
    if name == "triton":
        try:
            return importlib.import_module("autoq.kernels.triton_backend")
        except ImportError as err:
            raise RuntimeError(
                f"AUTOQ_BACKEND=triton but the Triton kernels cannot be imported ({err}); "
                "install them with `pip install 'autoq[triton]'`"
            ) from err
    if name == "reference":
        from autoq.kernels import reference

        return reference
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def select_backend(family: str, weight: QuantizedWeight, x: torch.Tensor) -> str:
    """The backend that will run ``family`` for this weight and input."""
    name = requested_backend() or default_backend(x.device)
    if name != "reference" and backend_module(name).supports(family, weight, x) is not None:
        return "reference"
    return name
