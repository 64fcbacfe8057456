"""``python -m autoq.demo`` (``make demo``): quantize the bundled MiniLM with the default budget.

Runs the code path of ``autoq quantize bundled:minilm --out out/minilm-autoq``, prints the
per-layer table and the embedding cosine against the unquantized model on sentences that are not
in the calibration set, and leaves the checkpoint (with plan.json) in ``out/minilm-autoq``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

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
    from autoq.plan import layer_bytes

    console = Console(width=max(Console().width, 100), soft_wrap=True)
    start = time.perf_counter()
    result = quantize("bundled:minilm", out_dir=OUT_DIR)
    model, tokenizer, plan = result.model, result.tokenizer, result.plan
    seconds = time.perf_counter() - start

    table = Table(title=f"bundled:minilm, {plan.objective}, budget {plan.budget:g} bits", title_justify="left")
    for column, justify in (("layer", "left"), ("shape", "right"), ("format", "left"), ("bytes", "right")):
        table.add_column(column, justify=justify)
    for name, layer in plan.layers.items():
        table.add_row(name, f"{layer.out_features}x{layer.in_features}", layer.format,
                      f"{layer_bytes(layer.numel, layer.bits[layer.format]):,}")
    console.print(table)

    reference, _ = load_model("bundled:minilm")
    cosine = torch.nn.functional.cosine_similarity(
        sentence_embeddings(model, tokenizer, HELD_OUT), sentence_embeddings(reference, tokenizer, HELD_OUT))
    t = plan.totals
    console.print(f"effective bits {t.effective_bits:.3f} | weights {t.size_bytes / 2**20:.2f} MiB "
                  f"(vs {t.size_bytes_unquantized / 2**20:.2f} MiB at 16 bits) | predicted linear-layer "
                  f"latency {t.latency * 1e3:.2f} ms vs {t.latency_unquantized * 1e3:.2f} ms unquantized",
                  highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"embedding cosine vs the unquantized model on {len(HELD_OUT)} held-out sentences: "
                  f"mean {float(cosine.mean()):.4f}, min {float(cosine.min()):.4f}", highlight=False)
    console.print(f"{'cached plan reused' if plan.from_cache else 'searched'} in {seconds:.1f} s; "
                  f"checkpoint and plan.json in {OUT_DIR}/", highlight=False)


if __name__ == "__main__":
    main()
