"""MiniLM's 6-bit plan quality by search path: streamed (the model directory), in memory, and a
baseline checkout (``--baseline PATH``, e.g. a worktree of main), each in a fresh process with its
own caches. Held-out embedding cosine vs fp32 (bench/search.py's HELD_OUT sentences), for the
balanced objective (latency-aware, so the measured timings enter) and the accuracy objective.

    .venv/bin/python bench/minilm_paths.py --baseline /tmp/autoq-main
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/kernels.py


def child(mode: str, objective: str) -> str:
    import torch
    import transformers

    import autoq
    from autoq.calibration import bundled_texts, text_batches
    from autoq.models import bundled_minilm_dir

    sys.path.append(str(REPO / "bench"))
    from search import HELD_OUT

    directory = bundled_minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    held = dict(tokenizer(HELD_OUT, padding=True, return_tensors="pt"))

    def embedding(model):
        with torch.no_grad():
            hidden = model(**held).last_hidden_state
        mask = held["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    reference = embedding(transformers.AutoModel.from_pretrained(directory).eval())
    model = str(directory) if mode == "streamed" else transformers.AutoModel.from_pretrained(directory).eval()
    model, plan = autoq.autoquant(model, text_batches(bundled_texts(), tokenizer), effective_bits=6,
                                  objective=objective, cache_dir=os.environ["AUTOQ_CACHE_DIR"], progress=False)
    cosine = torch.nn.functional.cosine_similarity(embedding(model), reference, dim=-1).mean().item()
    return f"{plan.effective_bits:.3f} bits, held-out cosine {cosine:.5f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(*args.child))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    print(f"# MiniLM at 6 bits by search path (autoq {commit.stdout.strip()})\n")
    print("| objective | path | result |\n|---|---|---|")
    runs = [("streamed", REPO), ("in memory", REPO)] + ([("baseline, in memory", args.baseline)] if args.baseline else [])
    for objective in ("balanced", "accuracy"):
        for label, root in runs:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "PYTHONPATH": str(root), "AUTOQ_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
                mode = "streamed" if label == "streamed" else "memory"
                done = subprocess.run([sys.executable, __file__, "--child", mode, objective], env=env,
                                      capture_output=True, text=True)
                result = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-300:]
            print(f"| {objective} | {label} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
