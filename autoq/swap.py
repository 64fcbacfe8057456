"""Find the quantizable layers of a model and replace them with quantized modules, in place.

Quantizable: ``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D`` (whose weight is stored transposed,
``[in, out]``; it becomes an ordinary ``[out, in]`` quantized Linear).

Rules:
- A layer whose weight is shared with an ``nn.Embedding`` (a tied output head) is left out by
  default: quantizing it would untie it from the embedding.
- A module reachable under several names (a shared module) is quantized once; every name then
  points to the same quantized module. Two layers that share one weight tensor share the quantized
  tensors too, so tied weights stay tied.
- ``exclude`` patterns are regular expressions matched with ``re.search`` against the qualified name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from autoq import formats
from autoq.formats import QuantizedWeight
from autoq.modules import QuantizedLinear, quantize_layer

try:  # transformers is a dependency, but keep the swap usable on plain PyTorch models.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D) if Conv1D else isinstance(module, nn.Linear)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out_features, in_features]``."""
    return module.weight.t() if Conv1D and isinstance(module, Conv1D) else module.weight


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a quantizable or quantized layer."""
    if isinstance(module, QuantizedLinear):
        return module.out_features, module.in_features
    out_features, in_features = float_weight(module).shape
    return int(out_features), int(in_features)


def tensor_identity(t: torch.Tensor) -> tuple:
    """Two tensors are the same tensor exactly when these match: the same view (offset, shape,
    strides, dtype) of the same memory. Different views of one buffer are different tensors."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _embedding_weights(model: nn.Module) -> set[tuple]:
    return {tensor_identity(m.weight) for m in model.modules()
            if isinstance(m, nn.Embedding) and m.weight.device.type != "meta"}


METHODS = ("rtn", "gptq")
GPTQ_DAMP = 0.1  # relative dampening; 0.03-0.2 measured equally good on MiniLM, 0.01 slightly worse


class LayerQuantizer:
    """Quantizes each (layer, format) once and remembers it, so every stage of a search (and
    ``apply`` afterwards) uses the very same weights.

    ``method="rtn"``: round to nearest (each format's own ``quantize``). ``method="gptq"``: GPTQ
    against ``hessians[name]`` (``[K, K]``, see ``autoq.gptq``) for formats that have a GPTQ grid;
    a layer without a usable Hessian (never ran, degenerate) and a format without a grid fall
    back to round-to-nearest, and ``methods``/``notes`` say so.
    """

    def __init__(self, method: str = "rtn", hessians: Mapping[str, torch.Tensor] | None = None,
                 only: set[tuple[str, str]] | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "gptq" and hessians is None:
            raise ValueError("GPTQ needs the calibration Hessians of the layers it quantizes")
        self.method = method
        self.only = only  # with GPTQ: the (layer, format) pairs that take it; the rest round to nearest
        self.hessians = dict(hessians or {})
        self.modules: dict[tuple[str, str], QuantizedLinear] = {}
        self.methods: dict[tuple[str, str], str] = {}  # the method each (layer, format) got
        self.notes: dict[str, str] = {}  # layer -> why GPTQ fell back to round-to-nearest
        self._prepared: dict[int, object] = {}  # by Hessian: layers sharing an input share it

    def precompute(self, layers: Mapping[str, nn.Module], fmts: Iterable[str],
                   report: Callable[[float, str], None] | None = None) -> None:
        """GPTQ every (layer, format) up front, layers of one shape and format in one batched
        column loop (``gptq.gptq_quantize_many``): the same weights ``get`` would compute, several
        times faster on small layers, whose loop is mostly per-column overhead."""
        from autoq import gptq

        if self.method != "gptq":
            return
        # (grid identity, shape) -> the formats sharing that grid and the layers to run
        work: dict[tuple[str, tuple[int, int]], tuple[list[str], list[str]]] = {}
        wanted: set[tuple[str, str]] = set()
        for fmt_name in dict.fromkeys(fmts):
            fmt = formats.get(fmt_name)
            for name, module in layers.items():
                key, shape = (name, fmt_name), layer_shape(module)
                if key in self.modules or (self.only is not None and key not in self.only):
                    continue
                if not fmt.quantized or fmt.check(*shape) or (grid := fmt.gptq_grid(*shape)) is None:
                    continue
                if self._prepared_hessian(name, float_weight(module).device) is None:
                    continue
                wanted.add(key)
                fmt_names, names = work.setdefault((grid.identity, shape), ([], []))
                if fmt_name not in fmt_names:
                    fmt_names.append(fmt_name)
                if name not in names:
                    names.append(name)
        for done, ((identity, (n, k)), (fmt_names, names)) in enumerate(work.items()):
            if report is not None:
                report(done / len(work), f"GPTQ {identity}: {len(names)} layers of {n}x{k}")
            grid = formats.get(fmt_names[0]).gptq_grid(n, k)
            weights = [float_weight(layers[name]).detach().float() for name in names]
            hessians = [self._prepared_hessian(name, weights[0].device) for name in names]
            results = gptq.gptq_quantize_many(weights, hessians, grid.group_size, grid.fit, grid.fake_quant)
            for name, weight, result in zip(names, weights, results, strict=True):
                for fmt_name in fmt_names:
                    if (name, fmt_name) not in wanted:
                        continue
                    encoded = formats.get(fmt_name).gptq_grid(n, k).encode(result.weight, result.params)
                    self.modules[(name, fmt_name)] = quantize_layer(weight, layers[name].bias, fmt_name, encoded)
                    self.methods[(name, fmt_name)] = "gptq"
        if report is not None:
            report(1.0, f"GPTQ: {len(wanted)} (layer, format) pairs quantized")

    def _prepared_hessian(self, name: str, device: torch.device):
        """The factored Hessian of a layer (shared by layers with one input), or ``None`` with a
        note when GPTQ cannot use it."""
        from autoq import gptq

        hessian = self.hessians.get(name)
        if hessian is None:
            self.notes[name] = f"layer {name}: GPTQ fell back to round-to-nearest (it never ran on the calibration data)"
            return None
        if id(hessian) not in self._prepared:
            try:
                self._prepared[id(hessian)] = gptq.prepare_hessian(hessian, GPTQ_DAMP, device)
            except gptq.DegenerateHessian as err:
                self._prepared[id(hessian)] = err
        prepared = self._prepared[id(hessian)]
        if isinstance(prepared, gptq.DegenerateHessian):
            self.notes[name] = f"layer {name}: GPTQ fell back to round-to-nearest ({prepared.reason})"
            return None
        return prepared

    def get(self, module: nn.Module, fmt: str, name: str) -> QuantizedLinear:
        key = (name, fmt)
        if key not in self.modules:
            weight = float_weight(module).detach()
            use_gptq = self.method == "gptq" and (self.only is None or key in self.only)
            quantized = self._gptq(name, weight, formats.get(fmt)) if use_gptq else None
            self.modules[key] = quantize_layer(weight, module.bias, fmt, quantized)
            self.methods[key] = "gptq" if quantized is not None else "rtn"
        return self.modules[key]

    def _gptq(self, name: str, weight: torch.Tensor, fmt: formats.Format) -> QuantizedWeight | None:
        from autoq import gptq

        grid = fmt.gptq_grid(*weight.shape) if fmt.quantized and not fmt.check(*weight.shape) else None
        if grid is None:
            return None
        prepared = self._prepared_hessian(name, weight.device)
        if prepared is None:
            return None
        result = gptq.gptq_quantize(weight.float(), prepared, grid.group_size, grid.fit, grid.fake_quant)
        return grid.encode(result.weight, result.params)


QuantizedMemo = LayerQuantizer


def quantized_copy(module: nn.Module, fmt: str, name: str = "",
                   memo: LayerQuantizer | None = None) -> QuantizedLinear:
    """A quantized module for the float layer ``module`` (left untouched); with ``memo``, built
    once per (name, format), with its method, and shared by every stage that asks for it."""
    if memo is not None:
        return memo.get(module, fmt, name)
    return quantize_layer(float_weight(module).detach(), module.bias, fmt)


def tied_to_embedding(model: nn.Module) -> set[str]:
    """Names of quantizable layers whose weight is shared with an input embedding."""
    embeddings = _embedding_weights(model)
    tied = set()
    for name, module in model.named_modules():
        if is_quantizable(module) and module.weight.device.type != "meta":
            if tensor_identity(float_weight(module)) in embeddings or \
                    tensor_identity(module.weight) in embeddings:
                tied.add(name)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is head and head is not None:
                tied.add(name)
    return tied


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def quantizable_layers(
    model: nn.Module, exclude: Iterable[str] = (), include_tied: bool = False
) -> dict[str, nn.Module]:
    """``{qualified_name: module}`` for every quantizable layer, in model order.

    A shared module is listed once, under its first name.
    """
    exclude = list(exclude)
    tied = set() if include_tied else tied_to_embedding(model)
    return {name: m for name, m in model.named_modules()
            if is_quantizable(m) and name not in tied and not _matches(name, exclude)}


def _parents_of(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each module id, every (parent, attribute) that holds it — shared modules included."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attr))
    return parents


def assignment_of(assignment) -> Mapping[str, str]:
    """Accept ``{name: format}`` or any object with a ``.assignment()`` mapping (a Plan)."""
    if isinstance(assignment, Mapping):
        return assignment
    if hasattr(assignment, "assignment"):
        return assignment.assignment()
    raise TypeError(f"expected a mapping {{layer name: format}} or a Plan, got {type(assignment).__name__}")


def apply(
    model: nn.Module,
    assignment,
    exclude: Iterable[str] = (),
    include_tied: bool = False,
    quantizer: LayerQuantizer | None = None,
) -> nn.Module:
    """Swap the named layers for quantized modules in place and return the model.

    ``assignment`` maps qualified layer names to format names (``"none"`` leaves a layer as it
    is); a Plan is accepted too. Layers not named are left unchanged. ``quantizer`` quantizes
    them (default: round to nearest); ``autoq.apply`` passes a GPTQ one where a plan asks.
    """
    assignment = dict(assignment_of(assignment))
    candidates = quantizable_layers(model, include_tied=True)
    tied = set() if include_tied else tied_to_embedding(model)
    aliases = _module_aliases(model)
    exclude = list(exclude)
    for name, fmt_name in assignment.items():
        fmt = formats.get(fmt_name)  # clear error for an unknown format
        canonical = aliases.get(name, name)
        if canonical not in candidates:
            valid = list(candidates)
            raise ValueError(
                f"{name!r} is not a quantizable layer of this model; valid names ({len(valid)}): "
                f"{', '.join(valid[:12])}{' ...' if len(valid) > 12 else ''}"
            )
        if not fmt.quantized:
            continue
        if canonical in tied:
            raise ValueError(
                f"{name!r} shares its weight with an input embedding; quantizing it would untie them. "
                "Leave it out, or pass include_tied=True to quantize it anyway (the embedding stays float)."
            )
        if _matches(name, exclude):
            continue
        module = candidates[canonical]
        reason = fmt.check(*layer_shape(module))
        if reason:
            raise ValueError(f"layer {name!r} cannot take {fmt_name}: {reason}")

    per_module: dict[str, str] = {}
    for name, fmt_name in assignment.items():
        canonical = aliases.get(name, name)
        if not formats.get(fmt_name).quantized or _matches(name, exclude):
            continue
        if per_module.setdefault(canonical, fmt_name) != fmt_name:
            raise ValueError(
                f"{canonical!r} is one module shared under several names and was given two formats "
                f"({per_module[canonical]} and {fmt_name}); give all its names the same format"
            )

    parents = _parents_of(model)
    quantized_weights: dict[tuple[tuple, str], QuantizedWeight] = {}
    for canonical, fmt_name in per_module.items():
        module = candidates[canonical]
        weight = float_weight(module)
        key = (tensor_identity(module.weight), fmt_name)
        if quantizer is not None and key not in quantized_weights:
            qlayer = quantizer.get(module, fmt_name, canonical)
        else:
            qlayer = quantize_layer(weight, module.bias, fmt_name, quantized_weights.get(key))
        quantized_weights.setdefault(key, qlayer.quantized_weight())
        for parent, attr in parents[id(module)]:
            setattr(parent, attr, qlayer)
    return model


@contextmanager
def swapped(model: nn.Module, replacement: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Put ``replacement[name]`` in place of each named layer (under every name a shared module
    has) for the duration of the ``with`` block, then restore the originals."""
    parents = _parents_of(model)
    originals = {name: model.get_submodule(name) for name in replacement}

    def put(modules: Mapping[str, nn.Module]) -> None:
        for name, new in modules.items():
            for parent, attr in parents[id(originals[name])]:
                setattr(parent, attr, new)

    put(replacement)
    try:
        yield model
    finally:
        put(originals)


def _module_aliases(model: nn.Module) -> dict[str, str]:
    """Map every name of a shared module to the first name ``named_modules`` gives it."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(module), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def layer_formats(model: nn.Module) -> dict[str, str]:
    """``{name: format}`` for every quantized layer of a model."""
    return {name: m.format_name for name, m in quantized_layers(model).items()}
