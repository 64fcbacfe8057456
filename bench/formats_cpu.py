"""Time every autoq format against fp32 and bf16 ``F.linear`` on this CPU.

Shapes: MiniLM's Linear layers and Llama-7B-shaped layers (N x K), at M in {1, 32, 512}.
Prints a markdown table (median ms per call; speedup vs fp32 in brackets) and the bytes of each
format, and writes it to ``bench/results/formats-cpu.md``.

    .venv/bin/python bench/formats_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autoq import formats
from autoq.bench import cpu_name
from autoq.modules import quantize_layer

SHAPES = {  # name: (N, K) = (out_features, in_features)
    "MiniLM qkv/o 384x384": (384, 384),
    "MiniLM up 1536x384": (1536, 384),
    "MiniLM down 384x1536": (384, 1536),
    "Llama-7B attn 4096x4096": (4096, 4096),
    "Llama-7B up 11008x4096": (11008, 4096),
    "Llama-7B down 4096x11008": (4096, 11008),
}
M_VALUES = (1, 32, 512)
QUANTIZED = [f for f in formats.names() if f != "none"]


def median_ms(fn, min_time: float = 0.3, max_reps: int = 50) -> float:
    """Warm up twice, then repeat until ``min_time`` seconds or ``max_reps`` calls; median."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name != "bias")


def cpu_description() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM shapes only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "formats-cpu.md"))
    args = parser.parse_args()
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("MiniLM")}

    torch.manual_seed(0)
    header = ["shape (N x K)", "M", "fp32", "bf16", *QUANTIZED]
    rows: list[list[str]] = []
    sizes: list[list[str]] = []
    with torch.no_grad():
        for name, (n, k) in shapes.items():
            weight = torch.randn(n, k) * 0.02
            bias = torch.randn(n) * 0.01
            weight_bf16, bias_bf16 = weight.bfloat16(), bias.bfloat16()
            modules = {fmt: quantize_layer(weight, bias, fmt) for fmt in QUANTIZED}
            sizes.append([name, f"{weight.numel() * 4 / 1e6:.2f}", f"{weight.numel() * 2 / 1e6:.2f}"]
                         + [f"{weight_bytes(m) / 1e6:.2f}" for m in modules.values()])
            for m in M_VALUES:
                x = torch.randn(m, k)
                x_bf16 = x.bfloat16()
                fp32 = median_ms(lambda x=x, w=weight, b=bias: F.linear(x, w, b))
                bf16 = median_ms(lambda x=x_bf16, w=weight_bf16, b=bias_bf16: F.linear(x, w, b))
                cells = [name, str(m), f"{fp32:.3f}", f"{bf16:.3f} ({fp32 / bf16:.2f}x)"]
                for module in modules.values():
                    t = median_ms(lambda x=x, module=module: module(x))
                    cells.append(f"{t:.3f} ({fp32 / t:.2f}x)")
                rows.append(cells)
                print(" | ".join(cells), flush=True)

    def table(head, body):
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

    text = "\n".join([
        "# autoq formats on CPU",
        "",
        f"Machine: {cpu_description()}.",
        "",
        "Median milliseconds per call of `module(x)` with fp32 activations `x` of shape [M, K]"
        " (speedup vs fp32 `F.linear` in brackets). `bf16` is `F.linear` with bf16 weight and"
        " activations. Native kernels: int8_dynamic = per-token quantization + `torch._int_mm`;"
        " int8_weight_only = `aten._weight_int8pack_mm` (bf16); int4 = `aten._weight_int4pack_mm_for_cpu`"
        " (bf16); from M=128 the weight-only formats dequantize 256 output rows at a time to bf16"
        " and run the bf16 GEMM (faster there).",
        "",
        table(header, rows),
        "",
        "## Weight bytes (MB; quantized formats include scales and zero points, not the bias)",
        "",
        table(["shape (N x K)", "fp32", "bf16", *QUANTIZED], sizes),
        "",
    ])
    print()
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
