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
from collections.abc import Iterable, Iterator, Mapping
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


QuantizedMemo = dict[tuple[str, str], QuantizedLinear]


def quantized_copy(module: nn.Module, fmt: str, name: str = "",
                   memo: QuantizedMemo | None = None) -> QuantizedLinear:
    """A quantized module for the float layer ``module`` (left untouched); with ``memo``, built
    once per (name, format) and shared by every stage that asks for it."""
    if memo is not None and (name, fmt) in memo:
        return memo[(name, fmt)]
    qmodule = quantize_layer(float_weight(module).detach(), module.bias, fmt)
    if memo is not None:
        memo[(name, fmt)] = qmodule
    return qmodule


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


def _assignment_of(assignment) -> Mapping[str, str]:
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
) -> nn.Module:
    """Swap the named layers for quantized modules in place and return the model.

    ``assignment`` maps qualified layer names to format names (``"none"`` leaves a layer as it
    is); a Plan is accepted too. Layers not named are left unchanged.
    """
    assignment = dict(_assignment_of(assignment))
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
