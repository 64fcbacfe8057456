"""What a quantization format is: one object that owns everything about it.

A :class:`Format` owns

- its name and exact storage cost (:meth:`Format.storage_bits`, scales and zero points included);
- which weight shapes it can hold (:meth:`Format.check`) and on which devices it runs
  (:meth:`Format.unsupported_reason`);
- how to quantize a float weight (:meth:`Format.quantize`, taking calibration statistics when the
  quantization method needs them) and what the stored tensors mean (:meth:`Format.dequantize`,
  :meth:`Format.reference_linear`: the numbers every kernel is tested against);
- its module's buffers (:meth:`Format.tensor_specs`; the module is ``autoq.modules.QuantizedLinear``);
- its kernels, one per backend, in the class's :attr:`Format.kernels` table, filled by the
  kernel modules with :func:`register_kernel` (so this layer never imports ``autoq.kernels``);
- its compressed-tensors scheme and tensor layout (``ct_*`` methods) for export and import.

Nothing outside a format's definition asks what *kind* of format it is: code calls these
methods, and a format that cannot do something raises saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight in its format's storage layout (see each format's docstring)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by buffer name (what a module registers)."""
        out = {"qweight": self.qweight, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        return out

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows ``start:stop`` (every stored tensor is indexed by output row first)."""
        zero_point = None if self.zero_point is None else self.zero_point[start:stop]
        return QuantizedWeight(self.qweight[start:stop], self.scale[start:stop], zero_point,
                               stop - start, self.in_features, self.group_size)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The weight whose output rows are ``parts``' rows in order (inverse of :meth:`rows`)."""
        first = parts[0]
        zero_point = None if first.zero_point is None else torch.cat([p.zero_point for p in parts])
        return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]),
                               zero_point, sum(p.out_features for p in parts), first.in_features,
                               first.group_size)


# A weight is quantized this many elements of rows at a time: every format's parameters are per
# output row (or per group within a row), and chunks bound the fp32 temporaries of a large
# weight (a 32000 x 2048 head would otherwise need about 1 GB of them). 256 KiB of fp32 a chunk:
# the temporaries stay in cache and under the streamed search's 1 MiB mmap threshold
# (autoq.stream.MMAP_THRESHOLD), where each larger temporary is page-faulted anew: int4 with its
# range search on a 32000 x 256 head 0.19 s instead of 0.29 s (1.1 s under that threshold).
QUANTIZE_CHUNK_ELEMENTS = 1 << 16


class Kernel(Protocol):
    """One backend's implementation of one format (see ``autoq.kernels``)."""

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        """``None`` when this kernel can run ``x @ weight.T``, else the reason it cannot."""

    def prepare(self, weight: QuantizedWeight) -> object:
        """The backend's own layout of ``weight`` (built once per device, cached by the module)."""

    def linear(self, x: torch.Tensor, prepared: object, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` is 2-D ``[M, K]``; the result is ``[M, N]`` in ``x.dtype``."""


TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class GPTQGrid:
    """What GPTQ (``autoq.gptq``) needs from a format: its static groups and its grid.

    ``fit(w [N, group_size]) -> params`` fits one group; ``fake_quant(w [N, c], params, offset)``
    rounds columns onto that group's grid; ``encode(w_hat [N, K], params per group)`` turns the
    grid values into the format's stored tensors, exactly. Formats whose grids have the same
    ``identity`` (W8A8 and W8A16 store the same int8 weight) share one GPTQ run."""

    identity: str
    group_size: int
    fit: Callable
    fake_quant: Callable
    encode: Callable[[torch.Tensor, list], QuantizedWeight]


class Format:
    """Base class of every format; subclasses define the storage and the arithmetic."""

    kernels: ClassVar[dict[str, Kernel]] = {}
    quantized: ClassVar[bool] = True  # False only for "none", which keeps the float layer
    # Activations stay float: the layer's output is exactly ``x @ dequantize(W).T + b`` (formats
    # that quantize activations set False).
    weight_only: ClassVar[bool] = True
    weight_bits: ClassVar[int]  # bits of one stored weight value, before scales

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kernels = {}  # each format class has its own table

    def __init__(self, name: str, description: str, default_candidate: bool = True):
        self.name = name
        self.description = description
        # Searched when the caller names no formats; formats whose exports not every loader
        # reads are opt-in.
        self.default_candidate = default_candidate

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    # ------------------------------------------------------------------------ storage

    @property
    def bits(self) -> float:
        """Nominal bits per weight element, scale overhead included (for a 4096x4096 weight)."""
        return self.storage_bits(4096, 4096)

    @property
    def group_size(self) -> int | None:
        return None

    def storage_bits(self, out_features: int, in_features: int) -> float:
        """Exact bits per weight element of a ``[out_features, in_features]`` weight."""
        raise NotImplementedError

    def check(self, out_features: int, in_features: int) -> str | None:
        """``None`` when the format can hold a weight of this shape, else the reason it cannot."""
        return None

    def unsupported_reason(self, device: torch.device) -> str | None:
        """``None`` when the format runs on ``device``, else why not (the search drops it)."""
        return None

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        """The module's quantized buffers: ``{name: (shape, dtype)}``."""
        raise NotImplementedError

    def weight_from_tensors(self, tensors: dict[str, torch.Tensor], out_features: int,
                            in_features: int) -> QuantizedWeight:
        """The ``QuantizedWeight`` a module's stored buffers stand for."""
        return QuantizedWeight(tensors["qweight"], tensors["scale"], tensors.get("zero_point"),
                               out_features, in_features, self.group_size)

    # ------------------------------------------------------------------- quantization

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize a float weight ``[out_features, in_features]`` into the storage layout."""
        if not self.quantized:
            raise ValueError(f"format {self.name!r} keeps the float weight; there is nothing to quantize")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        reason = self.check(out_features, in_features)
        if reason:
            raise ValueError(f"cannot quantize a {out_features}x{in_features} weight to {self.name}: {reason}")
        rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(in_features, 1))
        parts = [self._quantize(chunk.float()) for chunk in weight.detach().split(rows)]
        return parts[0] if len(parts) == 1 else QuantizedWeight.cat(parts)

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def gptq_grid(self, out_features: int, in_features: int) -> GPTQGrid | None:
        """How GPTQ quantizes this format (``None``: it cannot, round-to-nearest is used)."""
        return None

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` the stored tensors stand for."""
        raise NotImplementedError

    def reference_linear(self, x: torch.Tensor, weight: QuantizedWeight,
                         bias: torch.Tensor | None) -> torch.Tensor:
        """The exact result every kernel of this format approximates: ``[M, K] -> [M, N]``.

        Weight-only formats: a float matmul with the dequantized weight. Formats that quantize
        activations override this."""
        w = self.dequantize(weight, torch.float32)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)

    # -------------------------------------------------------------- compressed-tensors

    def ct_scheme(self) -> dict:
        """The compressed-tensors scheme (without targets): weights, activations, format."""
        raise ValueError(f"format {self.name!r} has no compressed-tensors scheme")

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        """Whether a checkpoint's scheme (arguments with compressed-tensors' defaults filled in)
        is exactly this format."""
        return False

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's tensors in compressed-tensors' layout (names relative to the layer)."""
        raise ValueError(f"format {self.name!r} has no compressed-tensors layout")

    def ct_load_caveat(self) -> str | None:
        """Why some loaders cannot read this format's export (with the installed libraries),
        and what to use instead; ``None`` when every loader can."""
        return None

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        """Pop layer ``name``'s tensors from a compressed-tensors checkpoint into this format."""
        raise ValueError(f"format {self.name!r} has no compressed-tensors layout")


class PerChannel(Format):
    """Formats with 8-bit weight values (``value_dtype``) and one fp32 scale per output channel:
    ``w = q * scale``."""

    weight_bits = 8
    value_dtype: ClassVar[torch.dtype]

    def storage_bits(self, out_features: int, in_features: int) -> float:
        return 8.0 + 32 / in_features

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        return {"qweight": ((out_features, in_features), self.value_dtype),
                "scale": ((out_features,), torch.float32)}

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (weight.qweight.float() * weight.scale.float()[:, None]).to(dtype)


class Unquantized(Format):
    """``none``: the float layer stays; counted as 16 bits per weight."""

    quantized = False
    weight_bits = 16

    def storage_bits(self, out_features: int, in_features: int) -> float:
        return 16.0

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        raise ValueError("format 'none' has no quantized module: the float layer stays")


def register_kernel(backend: str, *format_classes: type[Format]) -> Callable[[type], type]:
    """Class decorator for a kernel: one instance serves every format of ``format_classes``."""

    def add(kernel_cls: type) -> type:
        kernel = kernel_cls()
        for fmt_cls in format_classes:
            if backend in fmt_cls.kernels:
                raise ValueError(f"{fmt_cls.__name__} already has a {backend} kernel")
            fmt_cls.kernels[backend] = kernel
        return kernel_cls

    return add


def scale_out(scale: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """A scale for a checkpoint: in the model's dtype when that holds it exactly (what
    compressed-tensors writes), else in its own dtype (loaders cast it, nothing is lost)."""
    exact = model_dtype == scale.dtype or (
        model_dtype in (torch.float32, torch.float64)
        and scale.dtype in (torch.float16, torch.bfloat16, torch.float32))
    return scale.to(model_dtype) if exact else scale.clone()


def int_args(num_bits: int, symmetric: bool, strategy: str, group_size: int | None = None,
             dynamic: bool = False, type_: str = "int") -> dict:
    """compressed-tensors ``QuantizationArgs`` as a dict."""
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic}


def plain_weights(weights: dict | None, type_: str = "int") -> bool:
    """Static weights of ``type_`` with no activation reordering we cannot run."""
    return (weights is not None and weights["type"] == type_ and not weights["dynamic"]
            and weights["actorder"] in (None, "weight", "static"))
