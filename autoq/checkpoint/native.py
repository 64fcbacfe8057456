"""autoq's own checkpoint format: ``model.safetensors`` + ``autoq.json`` (+ ``config.json``,
tokenizer files and ``plan.json`` when available).

``model.safetensors`` holds the model's full ``state_dict`` (quantized layers in the checkpoint
layout of ``autoq.formats``) and its non-persistent buffers (e.g. rotary ``inv_freq``), which a
meta-device skeleton could not otherwise recreate. Tensors that share memory (tied weights) are
stored once; ``autoq.json`` lists the aliases.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoq.modules import QuantizedLinear
from autoq.swap import _parents_of, quantized_layers, tensor_identity

CHECKPOINT_VERSION = 1
METADATA_FILE = "autoq.json"
WEIGHTS_FILE = "model.safetensors"


def is_native(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict().keys())
    return {name: buf for name, buf in model.named_buffers()
            if name not in persistent and buf is not None}


def dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that are the same view of the same memory; return (unique, aliases)."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        key = tensor_identity(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t
    # safetensors refuses any remaining partial overlap: give those their own memory.
    storages: set[int] = set()
    for name, t in unique.items():
        ptr = t.untyped_storage().data_ptr()
        unique[name] = t.detach().clone().contiguous() if ptr in storages else t.detach().contiguous()
        storages.add(ptr)
    return unique, aliases


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    return {name: {"format": m.format_name, "in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None,
                   "bias_dtype": str(m.bias.dtype).removeprefix("torch.") if m.bias is not None else None}
            for name, m in quantized_layers(model).items()}


def write_side_files(model: nn.Module, path: Path, tokenizer=None, plan=None) -> None:
    """config.json (Hugging Face models), tokenizer files and plan.json."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if plan is not None:
        plan.save(path / "plan.json")


def save(model: nn.Module, path: Path, tokenizer=None, plan=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    non_persistent = _non_persistent_buffers(model)
    tensors, aliases = dedupe_shared({**state, **non_persistent})
    config = getattr(model, "config", None)
    metadata = {
        "checkpoint_format": "autoq",
        "checkpoint_version": CHECKPOINT_VERSION,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "transformers": config is not None and hasattr(config, "save_pretrained"),
        "layers": layer_metadata(model),
        "aliases": aliases,
        "non_persistent_buffers": sorted(non_persistent),
    }
    write_side_files(model, path, tokenizer, plan)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return path


def build_skeleton(path: Path, architecture: str, model=None) -> nn.Module:
    """A float model with every parameter on the meta device."""
    if model is not None:
        return model() if callable(model) and not isinstance(model, nn.Module) else model
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} has no config.json, so autoq cannot rebuild the model; pass the model "
            "skeleton: load_quantized(path, model=lambda: MyModel(...))"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    model_cls = getattr(transformers, architecture, None)
    if model_cls is None:
        raise ValueError(f"transformers has no class {architecture!r} (from {path}/autoq.json); upgrade transformers or pass model=")
    with torch.device("meta"):
        return model_cls(config)


def install_quantized_modules(model: nn.Module, layers: dict[str, dict]) -> None:
    """Replace each named layer with an empty quantized module of the recorded format, on meta."""
    parents = _parents_of(model)
    for name, spec in layers.items():
        original = model.get_submodule(name)
        qlayer = QuantizedLinear(
            spec["in_features"], spec["out_features"], spec["bias"], spec["format"], device="meta",
            bias_dtype=getattr(torch, spec["bias_dtype"]) if spec["bias_dtype"] else torch.float32)
        for parent, attr in parents[id(original)]:
            setattr(parent, attr, qlayer)


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                   non_persistent: list[str]) -> None:
    """Load saved tensors into the skeleton with ``assign=True`` (no float copy is ever made)."""
    for alias, canonical in aliases.items():
        tensors[alias] = tensors[canonical]
    buffers = {name: tensors.pop(name) for name in non_persistent if name in tensors}
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[attr] = value
    # Tied parameters were stored once; give them back one shared Parameter object.
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise ValueError(f"checkpoint is missing tensors for {leftover[:8]}; it may be from another model version")


def load(path: Path, model=None, device: str = "cpu") -> nn.Module:
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("checkpoint_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer autoq (checkpoint version {metadata['checkpoint_version']}); upgrade autoq")
    skeleton = build_skeleton(path, metadata["architecture"], model)
    install_quantized_modules(skeleton, metadata["layers"])
    tensors = load_file(path / WEIGHTS_FILE, device=device)
    assign_tensors(skeleton, tensors, metadata["aliases"], metadata["non_persistent_buffers"])
    return skeleton.eval()
