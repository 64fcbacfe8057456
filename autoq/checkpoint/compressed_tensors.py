"""compressed-tensors checkpoints: what vLLM serves and transformers loads.

A directory holds ``config.json`` with a ``quantization_config`` (``quant_method:
"compressed-tensors"``), ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``), tokenizer files and autoq's ``plan.json`` when given.
A per-layer plan becomes one config group per format, each targeting its layers by exact module
name; quantizable layers left in float are listed in ``ignore``. With more than one
compression format the top-level ``format`` is ``"mixed-precision"`` and each group carries its
own.

| autoq format     | compressed-tensors scheme                         | format         |
|------------------|---------------------------------------------------|----------------|
| int8_dynamic     | W8A8: int8 symmetric per-channel weights, int8    | int-quantized  |
|                  | symmetric dynamic per-token input activations     |                |
| int8_weight_only | int8 symmetric per-channel weights                | pack-quantized |
| int8_g128        | W8A16: int8 symmetric, strategy group, 128        | pack-quantized |
| int4_g{G}        | W4A16_ASYM: int4 asymmetric, strategy group, G    | pack-quantized |

Tensors per layer (``[N, K]`` = ``[out_features, in_features]``):

- int-quantized: ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N, 1]``.
- pack-quantized int8: ``weight_packed`` int32 ``[N, K/4]``, ``weight_scale`` ``[N, 1]`` (per
  channel) or ``[N, K/G]`` (groups), ``weight_shape`` int64 ``[2]``.
- pack-quantized int4: ``weight_packed`` int32 ``[N, K/8]``, ``weight_scale`` ``[N, K/G]``,
  ``weight_zero_point`` int32 ``[N/8, K/G]``, ``weight_shape``.

Layouts, as compressed-tensors' ``pack_to_int32`` writes them: a value is stored offset by
``2**(bits-1)`` (int4 ``q`` in [-8, 7] is stored as ``q + 8``, which is autoq's unsigned value;
int8 as ``q + 128``), and value ``j`` of a group of ``32 // bits`` sits at bits ``[bits*j,
bits*(j+1))`` of its int32 word. Zero points are packed the same way along the output dimension
(``packed_dim=0``). W8A16 uses pack-quantized because that is the format compressed-tensors
infers for weight-only int8 and the one vLLM's WNA16 kernels accept.

Scales are written in the model's dtype (what compressed-tensors itself writes) when that dtype
holds them exactly: always for fp32 models, and int4 (fp16) scales of fp16 models. Otherwise they
keep autoq's dtype (fp32 for int8, fp16 for int4) and loaders cast them, so nothing is lost.
Reading converts back: int8 scales to fp32 (exact from any float dtype), int4 scales to fp16,
which rounds scales that a foreign checkpoint stored in fp32 or bf16.

Activation rounding of W8A8: autoq quantizes each token as compressed-tensors' own forward does
(what transformers runs, the scheme's spec): [-128, 127] with ``scale = absmax / 127.5``, round
half to even (``primitives.quantize_per_token_int8``). vLLM's int8 kernels use [-127, 127] and
``absmax / 127``, within one rounding step of that. Weight-only layers dequantize to identical
weights.

compressed-tensors quantizes ``nn.Linear`` layers only: models whose quantized layers come from
anything else (GPT-2's ``Conv1D``) and models that are not Hugging Face models are saved in
autoq's own format instead, with a warning that says why. vLLM fuses some sibling layers
(q/k/v, gate/up) and needs one scheme for all of them; the writer warns when a plan splits them.

Loading (:func:`load`) reads these checkpoints, and ones compressed-tensors writes for the
schemes above (int4 symmetric groups too, with zero point 8), into autoq's modules without making
float weights; other schemes raise an error naming them, and the compressed-tensors preset they
are when one is (``FP8`` has a static activation scale; ``NVFP4``, ``W4A8``, KV-cache schemes).
llm-compressor's ``W8A16`` preset, int8 in groups of 128, loads as ``int8_g128``. compressed-tensors rounds int8 weights
with ``absmax / 127.5``, so its checkpoints may hold -128, which autoq's int8 kernels accept.
Buffers no checkpoint holds (rotary ``inv_freq``) are recomputed by the model's ``_init_weights``,
as transformers does, so they come back in their constructor's dtype (fp32) even if the saved
model had cast them.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoq import formats
from autoq import primitives as P
from autoq.checkpoint import native
from autoq.modules import QuantizedLinear
from autoq.swap import is_quantizable

QUANT_METHOD = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, like transformers' "5GB"

# vLLM fuses these siblings into one layer, which must have one scheme.
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


# --------------------------------------------------------------------------- schemes


def scheme_for(format_name: str) -> dict:
    """The compressed-tensors scheme (without targets) for an autoq format."""
    return formats.get(format_name).ct_scheme()


def _args_with_defaults(args: dict | None) -> dict | None:
    """QuantizationArgs as a dict with compressed-tensors' defaults and inferred strategy."""
    if args is None:
        return None
    full = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": None,
        "dynamic": False,
        "actorder": None,
        **args,
    }
    if full["strategy"] is None:
        group_size = full["group_size"]
        full["strategy"] = (
            "tensor" if group_size is None else "channel" if group_size == -1 else "group"
        )
    return full


def describe_args(args: dict | None) -> str:
    """QuantizationArgs in words, e.g. ``int4 symmetric group size 128``."""
    args = _args_with_defaults(args)
    if args is None:
        return "none"
    text = (
        f"{args['type']}{args['num_bits']} "
        f"{'symmetric' if args['symmetric'] else 'asymmetric'} "
        f"{args['strategy']}"
    )
    if args["strategy"] == "group":
        text += f" size {args['group_size']}"
    if args["dynamic"]:
        text += " dynamic"
    return text


def describe_scheme(group: str, scheme: dict) -> str:
    return (
        f"config group {group!r} (weights: {describe_args(scheme.get('weights'))}; input "
        f"activations: {describe_args(scheme.get('input_activations'))}; output activations: "
        f"{describe_args(scheme.get('output_activations'))})"
    )


# What identifies a scheme; observers, scale and zero-point dtypes do not change what runs.
_SCHEME_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
_ACTIVATIONS = ("weights", "input_activations", "output_activations")


def preset_names(scheme: dict) -> list[str]:
    """The compressed-tensors presets (``W8A16``, ``FP8``, ...) that are this scheme, as
    llm-compressor's ``scheme=`` writes them; empty when none is or compressed-tensors is absent."""
    try:
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    except ImportError:
        return []

    def key(args: dict | None) -> tuple | None:
        full = _args_with_defaults(args)
        return None if full is None else tuple(str(full[k]) for k in _SCHEME_KEYS)

    def preset_args(args) -> dict | None:
        return None if args is None else args.model_dump(mode="json")

    wanted = tuple(key(scheme.get(a)) for a in _ACTIVATIONS)
    return [
        name
        for name, preset in PRESET_SCHEMES.items()
        if tuple(key(preset_args(preset.get(a))) for a in _ACTIVATIONS) == wanted
    ]


def _named(group: str, scheme: dict) -> str:
    """A scheme for an error message: its config group, arguments and preset name if any."""
    presets = preset_names(scheme)
    named = f" (compressed-tensors' {' / '.join(presets)} preset)" if presets else ""
    return describe_scheme(group, scheme) + named


def format_for_scheme(group: str, scheme: dict) -> str:
    """The autoq format that runs a compressed-tensors scheme; ValueError naming it otherwise."""
    weights = _args_with_defaults(scheme.get("weights"))
    acts = _args_with_defaults(scheme.get("input_activations"))
    if weights is not None and scheme.get("output_activations") is None:
        for fmt in formats.all_formats():
            if fmt.quantized and fmt.ct_accepts(weights, acts):
                return fmt.name
    readable = "; ".join(f"{f.name} ({f.description})" for f in formats.all_formats() if f.quantized)
    raise ValueError(f"{_named(group, scheme)} has no autoq format. autoq reads: {readable}")


# --------------------------------------------------------------------------- packing

pack_int32 = P.pack_int32
unpack_int32 = P.unpack_int32


# --------------------------------------------------------------------------- writing


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def export_layer(module: QuantizedLinear, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized layer's tensors in compressed-tensors' layout (names relative to the layer)."""
    out = module.format.ct_export(module.quantized_weight(), model_dtype)
    if module.bias is not None:
        out["bias"] = module.bias.detach().clone()
    return out


def _quantized_names(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every name of every quantized layer (a shared module appears under each of its names)."""
    return {
        name: m
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QuantizedLinear)
    }


def unsupported_reason(model: nn.Module) -> str | None:
    """``None`` when compressed-tensors can express ``model``, else why it cannot."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return "it is not a Hugging Face model (it has no config with save_pretrained)"
    layers = _quantized_names(model)
    if not layers:
        return "it has no quantized layers"
    # Quantized layers no longer show what they replaced: rebuild the architecture on the meta
    # device (no memory) and check each quantized name is an nn.Linear there.
    try:
        with torch.device("meta"):
            skeleton = type(model)(copy.deepcopy(config))
    except Exception as err:  # noqa: BLE001 - any failure means we cannot check
        return (
            f"{type(model).__name__} could not be rebuilt from its config to check its layers "
            f"({err})"
        )
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    for name in layers:
        try:
            original = skeleton.get_submodule(name)
        except AttributeError:
            return f"layer {name!r} does not exist in a fresh {type(model).__name__}"
        if not isinstance(original, nn.Linear):
            return (
                f"layer {name!r} was a {type(original).__name__}, not an nn.Linear, and "
                "compressed-tensors only quantizes nn.Linear layers"
            )
        if original is head and getattr(config, "tie_word_embeddings", False):
            return (
                f"its output layer {name!r} is quantized while tie_word_embeddings ties it to "
                "the input embedding, and loaders would tie it back"
            )
    return None


def _layer_format_map(model: nn.Module) -> dict[str, str]:
    """``{name: format}`` over every quantizable or quantized layer name ("none" for float)."""
    result = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear):
            result[name] = module.format_name
        elif is_quantizable(module):
            result[name] = "none"
    return result


def _warn_split_fused_layers(layer_formats: dict[str, str]) -> None:
    for name in layer_formats:
        parent, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf != siblings[0]:
                continue
            names = [f"{parent}.{s}" if parent else s for s in siblings]
            found = {n: layer_formats[n] for n in names if n in layer_formats}
            if len(set(found.values())) > 1:
                warnings.warn(
                    f"{', '.join(f'{n}={f}' for n, f in found.items())}: vLLM fuses these layers "
                    "into one and needs one scheme for all of them, so it may refuse this "
                    "checkpoint; transformers loads it",
                    stacklevel=4,
                )


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a quantized model."""
    return quantization_config_for(_layer_format_map(model))


def quantization_config_for(layer_formats: dict[str, str]) -> dict:
    """The ``quantization_config`` for ``{layer name: format}`` over every quantizable layer
    (``"none"`` for the ones left float, listed in ``ignore``)."""
    groups: dict[str, dict] = {}
    for name, format_name in layer_formats.items():
        if format_name == "none":
            continue
        if format_name not in groups:
            groups[format_name] = {"targets": [], **scheme_for(format_name)}
        groups[format_name]["targets"].append(name)
    compression_formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": QUANT_METHOD,
        "format": compression_formats.pop() if len(compression_formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [name for name, f in layer_formats.items() if f == "none"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with every quantized layer in compressed-tensors' layout."""
    layers = _quantized_names(model)
    model_dtype = _model_dtype(model)
    float_part = {
        key: t for key, t in model.state_dict().items() if key.rpartition(".")[0] not in layers
    }
    unique, aliases = native.dedupe_shared(float_part)
    # Tied weights transformers re-ties on load are left out, as save_pretrained does.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for alias, canonical in aliases.items():
        if alias not in tied:
            unique[alias] = unique[canonical].clone()
    tensors = dict(unique)
    for name, module in layers.items():
        for key, t in export_layer(module, model_dtype).items():
            tensors[f"{name}.{key}"] = t
    return tensors


class ShardWriter:
    """Writes tensors as they come into ``model.safetensors``, or into shards of at most
    ``max_shard_size`` bytes plus an index (each shard is written as soon as it is full, so no
    more than one shard is held in memory). ``close()`` names the shards and writes the index."""

    def __init__(self, path: Path, max_shard_size: int):
        for stale in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors"),
                      *path.glob(".shard-*.safetensors")]:
            stale.unlink(missing_ok=True)
        self.path, self.max_shard_size = path, max_shard_size
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_shard_size:
            self._flush()
        self.shard[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        file = self.path / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.shard, file, metadata={"format": "pt"})
        self.written.append((file, list(self.shard)))
        self.shard, self.size = {}, 0

    def close(self) -> list[Path]:
        if not self.written:  # everything fits one file
            save_file(self.shard, self.path / WEIGHTS_FILE, metadata={"format": "pt"})
            return [self.path / WEIGHTS_FILE]
        if self.shard:
            self._flush()
        files, weight_map = [], {}
        for i, (temporary, names) in enumerate(self.written, start=1):
            file = self.path / SHARD_PATTERN.format(index=i, total=len(self.written))
            temporary.replace(file)
            files.append(file)
            weight_map.update(dict.fromkeys(names, file.name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return files


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, max_shard_size: int
) -> list[Path]:
    """``model.safetensors``, or shards plus an index when larger than ``max_shard_size`` bytes."""
    writer = ShardWriter(path, max_shard_size)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()


def write_config(path: Path, config: dict, architecture: str, dtype: torch.dtype,
                 layer_formats: dict[str, str]) -> None:
    """``config.json``: the model's config with the architecture, dtype and quantization_config."""
    config = dict(config)
    config["architectures"] = [architecture]
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config_for(layer_formats)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def warn_load_caveats(layer_formats: dict[str, str]) -> None:
    """Warn about vLLM's fused layers with mixed formats and formats some loaders cannot read."""
    _warn_split_fused_layers(layer_formats)
    for caveat in sorted({c for f in set(layer_formats.values()) if (c := formats.get(f).ct_load_caveat())}):
        warnings.warn(caveat, stacklevel=4)


def save(
    model: nn.Module,
    path: Path,
    tokenizer=None,
    plan=None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint; when that cannot express it, warn and
    write autoq's own format (one file, ``max_shard_size`` does not apply)."""
    reason = unsupported_reason(model)
    if reason is not None:
        warnings.warn(
            f"compressed-tensors cannot express this model: {reason}; saving it in "
            "autoq's own format instead",
            stacklevel=3,
        )
        return native.save(model, path, tokenizer=tokenizer, plan=plan)
    layer_formats = _layer_format_map(model)
    warn_load_caveats(layer_formats)
    path.mkdir(parents=True, exist_ok=True)
    (path / native.METADATA_FILE).unlink(missing_ok=True)  # a stale autoq.json would win on load
    native.write_side_files(model, path, tokenizer, plan)
    write_config(path, json.loads((path / "config.json").read_text()), type(model).__name__,
                 _model_dtype(model), layer_formats)
    write_safetensors(export_state_dict(model), path, max_shard_size)
    return path


# --------------------------------------------------------------------------- reading


def is_compressed_tensors(path: Path) -> bool:
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return False
    qconfig = config.get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(weight_map.values())):
            tensors.update(load_file(path / file, device=device))
        return tensors
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    return load_file(path / WEIGHTS_FILE, device=device)


def _target_matches(name: str, module: nn.Module, target: str) -> str | None:
    """How ``target`` matches a module, as compressed-tensors matches it: by exact name, by
    ``re:`` regex (``re.match``, anchored at the start only) or by class name."""
    if target == name:
        return "name"
    if target.startswith("re:") and re.match(target[3:], name):
        return "regex"
    if any(cls.__name__ == target for cls in type(module).__mro__):
        return "class"
    return None


def _scheme_of(
    name: str, module: nn.Module, groups: dict[str, dict], ignore: list[str]
) -> str | None:
    """The config group that quantizes this module, chosen as compressed-tensors chooses: exact
    names beat regexes beat class names, ties go to the smallest target string, and a target
    listed in several groups belongs to the last."""
    if any(_target_matches(name, module, t) for t in ignore):
        return None
    target_group = {
        target: group for group, scheme in groups.items() for target in scheme.get("targets", [])
    }
    rank = {"name": 0, "regex": 1, "class": 2}
    matches = [
        (rank[kind], target)
        for target in target_group
        if (kind := _target_matches(name, module, target))
    ]
    return target_group[min(matches)[1]] if matches else None


def _check_supported(qconfig: dict) -> None:
    if kv_cache := qconfig.get("kv_cache_scheme"):
        raise ValueError(
            f"this compressed-tensors checkpoint quantizes the KV cache (kv_cache_scheme: "
            f"{describe_args(kv_cache)}), which autoq cannot run"
        )
    if qconfig.get("transform_config"):
        raise ValueError(
            "this compressed-tensors checkpoint uses transforms (rotations), which autoq cannot run"
        )
    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(
            f"this compressed-tensors checkpoint is sparse ({sparsity.get('format')}), which "
            "autoq cannot run"
        )


def import_layer(
    name: str,
    format_name: str,
    scheme: dict,
    out_features: int,
    in_features: int,
    tensors: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Pop one layer's compressed-tensors tensors and return them in autoq's layout."""
    weights = _args_with_defaults(scheme["weights"])
    n, k = out_features, in_features
    if f"{name}.weight_g_idx" in tensors:
        raise ValueError(
            f"layer {name!r} has an activation-order index (weight_g_idx), which autoq cannot run"
        )
    shape = tensors.pop(f"{name}.weight_shape", None)
    if shape is not None and [int(v) for v in shape] != [n, k]:
        raise ValueError(
            f"layer {name!r}: weight_shape {shape.tolist()} does not match the model's {[n, k]}"
        )
    fmt = formats.get(format_name)
    stored = fmt.tensor_specs(n, k)  # not the implied ones (a symmetric format's zero point)
    return {key: t for key, t in fmt.ct_import(name, weights, tensors, n, k).tensors().items() if key in stored}


def _restore_non_persistent_buffers(
    model: nn.Module, tensors: dict[str, torch.Tensor], device: str
) -> None:
    """Fill buffers that are not in the state dict: from the checkpoint when it has them (older
    checkpoints stored BERT's ``position_ids``), else recomputed by the model's own
    ``_init_weights`` (rotary ``inv_freq``, ``position_ids``), as transformers does after
    loading."""
    persistent = set(model.state_dict())
    missing = []
    for name, buf in list(model.named_buffers()):
        if name in persistent or buf is None or buf.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name in tensors:
            owner._buffers[attr] = tensors.pop(name)
            continue
        # Fill with a sentinel so a buffer that _init_weights does not set is caught below.
        sentinel = float("nan") if buf.is_floating_point() else torch.iinfo(buf.dtype).min
        owner._buffers[attr] = torch.full(buf.shape, sentinel, dtype=buf.dtype, device=device)
        missing.append((name, owner, attr))
    init = getattr(model, "_init_weights", None)
    for owner in {id(o): o for _, o, _ in missing}.values():
        if init is not None:
            init(owner)
    for name, owner, attr in missing:
        value = owner._buffers[attr]
        unset = (
            value.isnan().any()
            if value.is_floating_point()
            else (value == torch.iinfo(value.dtype).min).any()
        )
        if unset:
            raise ValueError(
                f"cannot recompute buffer {name!r}: it is not in the checkpoint and the "
                "model's _init_weights does not set it; save in autoq's format instead"
            )


def load(path: Path, model=None, device: str = "cpu") -> nn.Module:
    """Load a compressed-tensors checkpoint into autoq's quantized modules (no float weights)."""
    config = json.loads((path / "config.json").read_text())
    qconfig = config["quantization_config"]
    _check_supported(qconfig)
    architecture = (config.get("architectures") or [None])[0]
    if architecture is None and model is None:
        raise ValueError(f"{path}/config.json names no architecture; pass model= (a skeleton)")
    skeleton = native.build_skeleton(path, architecture, model)
    groups = {g: s for g, s in (qconfig.get("config_groups") or {}).items()}
    for group, scheme in groups.items():
        if isinstance(scheme, list):  # a preset name mapped to targets, e.g. {"W8A8": ["Linear"]}
            raise ValueError(
                f"config group {group!r} uses a preset by name; autoq needs the scheme spelled out"
            )
    tensors = read_safetensors(path, device)

    layers: dict[str, dict] = {}
    converted: dict[str, torch.Tensor] = {}
    for name, module in skeleton.named_modules():
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        group = _scheme_of(name, module, groups, qconfig.get("ignore") or [])
        if group is None or groups[group].get("weights") is None:
            if group is not None and groups[group].get("input_activations") is not None:
                raise ValueError(
                    f"{_named(group, groups[group])} quantizes activations only; "
                    "autoq cannot run it"
                )
            continue
        if isinstance(module, nn.Embedding):
            raise ValueError(
                f"{_named(group, groups[group])} quantizes embedding {name!r}; autoq "
                "quantizes Linear layers only"
            )
        format_name = format_for_scheme(group, groups[group])
        for key, t in import_layer(
            name, format_name, groups[group], module.out_features, module.in_features, tensors
        ).items():
            converted[f"{name}.{key}"] = t
        bias = tensors.get(f"{name}.bias")
        layers[name] = {
            "format": format_name,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "bias_dtype": str(bias.dtype).removeprefix("torch.") if bias is not None else None,
        }
    tensors.update(converted)

    native.install_quantized_modules(skeleton, layers)
    _restore_non_persistent_buffers(skeleton, tensors, device)
    result = skeleton.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(
            f"{path} holds tensors this model does not have: {result.unexpected_keys[:8]}"
        )
    skeleton_config = getattr(skeleton, "config", None)
    if (
        result.missing_keys
        and getattr(skeleton_config, "tie_word_embeddings", False)
        and hasattr(skeleton, "tie_weights")
    ):
        skeleton.tie_weights()
    leftover = [
        n
        for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()]
        if t.device.type == "meta"
    ]
    if leftover:
        raise ValueError(
            f"{path} is missing tensors for {leftover[:8]}; it may be from another model version"
        )
    return skeleton.eval()
