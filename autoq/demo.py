"""``python -m autoq.demo`` (``make demo``): quantize the bundled MiniLM with the default budget.

Runs the code path of ``autoq quantize bundled:minilm --out out/minilm-autoq --measure``, prints
the per-layer table (format, bits, sensitivity, predicted latency), the predicted and measured
forward time against the float model (fp32 and bf16) at the calibration batch shape, and the
embedding cosine against the unquantized model on sentences that are not in the calibration set,
and leaves the checkpoint (with plan.json) in ``out/minilm-autoq``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from rich.console import Console

OUT_DIR = Path("out/minilm-autoq")

# Not in autoq/data/calibration.txt.
HELD_OUT = [
    "The ferry to the island was cancelled because of fog.",
    "My grandmother keeps her recipes in a battered notebook.",
    "The new library stays open until midnight during exams.",
    "A family of foxes has moved into the railway embankment.",
    "The striker scored twice in the last ten minutes of the match.",
    "Please switch off the projector when the meeting ends.",
]


def sentence_embeddings(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (how all-MiniLM-L6-v2 is used)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from autoq.models import load_model
    from autoq.pipeline import quantize

    console = Console(width=max(Console().width, 100), soft_wrap=True)
    start = time.perf_counter()
    # Calibration batches are the bundled sentences, 8 at a time: the shape the demo then times.
    result = quantize("bundled:minilm", out_dir=OUT_DIR, measure=True)
    seconds = time.perf_counter() - start
    model, tokenizer, plan = result.model, result.tokenizer, result.plan
    console.print(plan.summary(), highlight=False, end="")

    reference, _ = load_model("bundled:minilm")
    cosine = torch.nn.functional.cosine_similarity(
        sentence_embeddings(model, tokenizer, HELD_OUT), sentence_embeddings(reference, tokenizer, HELD_OUT))
    console.print(result.speed_summary(), highlight=False)
    console.print(f"embedding cosine vs the unquantized model on {len(HELD_OUT)} held-out sentences: "
                  f"mean {float(cosine.mean()):.4f}, min {float(cosine.min()):.4f}", highlight=False)
    console.print(f"{'cached plan reused' if plan.from_cache else 'searched'} in {seconds:.1f} s; "
                  f"checkpoint and plan.json in {OUT_DIR}/", highlight=False)


if __name__ == "__main__":
    main()
