"""Save and load quantized models. Writers are pluggable: ``WRITERS[name](model, path, ...)``.

Every writer produces a directory with safetensors weights (nothing is ever pickled) and enough
metadata to rebuild the model without materialising float weights; ``load_quantized`` detects
which writer produced a directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from autoq.checkpoint import native

Writer = Callable[..., Path]
Reader = Callable[..., nn.Module]

WRITERS: dict[str, Writer] = {"autoq": native.save}
# (detector, reader) pairs, tried in order; the first whose detector accepts the directory loads it.
READERS: list[tuple[Callable[[Path], bool], Reader]] = [(native.is_native, native.load)]


def register_writer(name: str, writer: Writer) -> None:
    WRITERS[name] = writer


def register_reader(detector: Callable[[Path], bool], reader: Reader, first: bool = True) -> None:
    READERS.insert(0 if first else len(READERS), (detector, reader))


def default_format(model: nn.Module) -> str:
    return "autoq"


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None, *, format: str | None = None,
                   plan=None) -> Path:
    """Write ``model`` (quantized with ``autoq.apply``) to the directory ``path``.

    ``format``: ``"autoq"`` (our own layout; every model) or another registered writer; by default
    the best format the model can be expressed in. ``plan`` (a Plan), when given, is written as
    ``plan.json`` beside the weights; ``tokenizer`` files are saved too.
    """
    name = format or default_format(model)
    if name not in WRITERS:
        raise ValueError(f"unknown checkpoint format {name!r}; choose one of {', '.join(WRITERS)}")
    return WRITERS[name](model, Path(path), tokenizer=tokenizer, plan=plan)


def load_quantized(path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None,
                   device: str = "cpu") -> nn.Module:
    """Load a directory written by :func:`save_quantized` (or a supported foreign format).

    Hugging Face models are rebuilt from ``config.json`` on the meta device. For other models pass
    ``model``: a float skeleton (ideally built under ``torch.device("meta")``) or a callable that
    returns one.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the directory save_quantized wrote")
    for detector, reader in READERS:
        if detector(path):
            return reader(path, model=model, device=device)
    raise ValueError(
        f"{path} holds no checkpoint autoq can read: expected autoq.json (autoq format) or a "
        "config.json with a supported quantization_config"
    )
