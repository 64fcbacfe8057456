"""Save and load quantized models. Writers are pluggable: ``WRITERS[name](model, path, ...)``.

Every writer produces a directory with safetensors weights (nothing is ever pickled) and enough
metadata to rebuild the model without materialising float weights; ``load_quantized`` detects
which writer produced a directory.

Formats: ``"compressed-tensors"`` (what vLLM serves and transformers loads; the default for
Hugging Face models whose quantized layers are all ``nn.Linear``) and ``"autoq"`` (our own
layout; every model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from autoq import compat
from autoq.checkpoint import compressed_tensors, native

compat.install()  # lets transformers load asymmetric int4 compressed-tensors checkpoints

Writer = Callable[..., Path]
Reader = Callable[..., nn.Module]

WRITERS: dict[str, Writer] = {"autoq": native.save, "compressed-tensors": compressed_tensors.save}
# (detector, reader) pairs, tried in order; the first whose detector accepts the directory loads it.
# autoq.json first: a model loaded from a compressed-tensors checkpoint keeps its
# quantization_config in config.json when re-saved in autoq's format.
READERS: list[tuple[Callable[[Path], bool], Reader]] = [
    (native.is_native, native.load),
    (compressed_tensors.is_compressed_tensors, compressed_tensors.load),
]


def register_writer(name: str, writer: Writer) -> None:
    WRITERS[name] = writer


def register_reader(detector: Callable[[Path], bool], reader: Reader, first: bool = True) -> None:
    READERS.insert(0 if first else len(READERS), (detector, reader))


def default_format(model: nn.Module) -> str:
    """``"compressed-tensors"`` when it can express ``model``, else ``"autoq"``."""
    return "compressed-tensors" if compressed_tensors.unsupported_reason(model) is None else "autoq"


def save_quantized(
    model: nn.Module,
    path: str | Path,
    tokenizer=None,
    *,
    format: str | None = None,
    plan=None,
    **options,
) -> Path:
    """Write ``model`` (quantized with ``autoq.apply``) to the directory ``path``.

    ``format``: ``"compressed-tensors"``, ``"autoq"`` (our own layout; every model) or another
    registered writer; by default compressed-tensors when it can express the model (a Hugging
    Face model whose quantized layers are all ``nn.Linear``), else autoq's format, with a warning
    for Hugging Face models saying why. ``plan`` (a Plan), when given, is written as
    ``plan.json`` beside the weights; ``tokenizer`` files are saved too. ``options`` go to the
    writer, e.g. ``max_shard_size`` (bytes) for compressed-tensors (autoq's format is one file).
    """
    if format is None:
        # The compressed-tensors writer falls back to autoq's format, with a warning saying why,
        # for Hugging Face models it cannot express.
        is_hf = hasattr(getattr(model, "config", None), "save_pretrained")
        name = "compressed-tensors" if is_hf else "autoq"
    else:
        name = format
    if name not in WRITERS:
        raise ValueError(f"unknown checkpoint format {name!r}; choose one of {', '.join(WRITERS)}")
    return WRITERS[name](model, Path(path), tokenizer=tokenizer, plan=plan, **options)


def load_quantized(
    path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None, device: str = "cpu"
) -> nn.Module:
    """Load a directory written by :func:`save_quantized` (or a supported foreign format).

    Hugging Face models are rebuilt from ``config.json`` on the meta device. For other models pass
    ``model``: a float skeleton (ideally built under ``torch.device("meta")``) or a callable that
    returns one.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; pass the directory save_quantized wrote"
        )
    for detector, reader in READERS:
        if detector(path):
            return reader(path, model=model, device=device)
    raise ValueError(
        f"{path} holds no checkpoint autoq can read: expected autoq.json (autoq format) or a "
        "config.json with a compressed-tensors quantization_config"
    )
