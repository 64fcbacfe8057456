"""Calibration data: what ``search`` runs the model on.

``calibration`` arguments accept an iterable of batches or a single batch; a dict batch is passed
as keyword arguments, a tuple as positional arguments, a tensor as the one argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor] | tuple | torch.Tensor


def bundled_texts() -> list[str]:
    """Ordinary English sentences shipped with autoq for calibration."""
    text = resources.files("autoq").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_batches(texts: Sequence[str], tokenizer, batch_size: int = 8, max_length: int = 128) -> list[dict]:
    """Tokenized batches (dicts of tensors) from a list of texts."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if not texts:
        raise ValueError("no calibration texts given; pass at least one sentence")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def as_batches(calibration: Any) -> list[Batch]:
    """Normalise ``calibration`` to a list of batches."""
    if isinstance(calibration, torch.Tensor | dict | tuple):
        return [calibration]
    if isinstance(calibration, Iterable) and not isinstance(calibration, str):
        batches = list(calibration)
        if not batches:
            raise ValueError("calibration is empty; pass at least one batch")
        return batches
    raise TypeError(
        f"calibration must be a batch (tensor, dict or tuple) or an iterable of batches, got "
        f"{type(calibration).__name__}; for texts use autoq.calibration.text_batches(texts, tokenizer)"
    )


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)


def run_batch(model: nn.Module, batch: Batch):
    """Call the model on one batch following the dict / tuple / tensor convention."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def fingerprint(batches: Sequence[Batch]) -> str:
    """A stable hash of the calibration data (shapes, dtypes and values)."""
    h = hashlib.sha256()

    def add(t):
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())

    for batch in batches:
        if isinstance(batch, dict):
            for k in sorted(batch):
                h.update(k.encode())
                add(batch[k])
        elif isinstance(batch, tuple):
            for v in batch:
                add(v)
        else:
            add(batch)
    return h.hexdigest()[:16]
