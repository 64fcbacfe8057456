"""Time every autoq format, and every CPU path of the integer formats, against fp32 ``F.linear``.

1. Paths: 4096x4096 at M = 1 and 32, fp32 activations: each candidate path of each integer format
   (``autoq.kernels.native``), the path the kernel picks, and torchao's CPU configs when torchao
   is installed.
2. Formats: ``module(x)`` (the picked path) on MiniLM's and Llama-7B-shaped layers at M in
   {1, 32, 512}, with torchao's configs beside them.
3. ``--minilm``: the MiniLM balanced 6-bit plan's forward at batch 32x64 and 1x64 vs fp32 eager.

Every comparison is interleaved (one call of each contender per round, median of the rounds),
so that a noisy neighbour slows all of them alike. Writes ``bench/results/formats-cpu-<isa>.md``.

    .venv/bin/python bench/formats_cpu.py [--quick] [--minilm] [--isa avx2] [--threads N] [--paths-only]

``--isa avx2`` imitates a CPU without AVX-512 and native bf16 (an AMD EPYC Zen 2/3) before torch
is imported: ``AUTOQ_CPU_ISA=avx2`` (autoq's paths and GEMV code), ``ATEN_CPU_CAPABILITY=avx2``
(torch's own kernels), ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN: ``_int_mm``, bf16 GEMMs) and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (fp32 GEMM). The memory system stays this machine's.
"""

from __future__ import annotations

import os
import sys

FORCED_ISA_ENV = {"avx2": {"AUTOQ_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                           "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
if "--isa" in sys.argv:  # before torch is imported: these are read when it loads
    os.environ.update(FORCED_ISA_ENV[sys.argv[sys.argv.index("--isa") + 1]])

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoq import formats  # noqa: E402
from autoq.kernels import cpu, native  # noqa: E402
from autoq.modules import quantize_layer  # noqa: E402

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
PATH_FORMATS = ["int8_dynamic", "int8_weight_only", "int4_g128", "int4_sym_g128", "int4_g32"]


STAT: Callable[[list[float]], float] = statistics.median  # --stat min: the best round


def interleaved_ms(calls: dict[str, Callable[[], object]], min_time: float = 0.4,
                   max_rounds: int = 25) -> dict[str, float]:
    """Median (or ``--stat min``) ms of each call: two warm-ups each, then rounds of one call
    each (at least 3)."""
    for call in calls.values():
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - start < min_time and rounds < max_rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: STAT(ts) * 1e3 for name, ts in times.items()}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return native.cpu_model_name()


def machine() -> str:
    isa = cpu.cpu_isa()
    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ}
    text = (f"{lscpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads;"
            f" ISA: {isa.describe()} (natively: {cpu.detect_native().describe()}); torch dispatches"
            f" {torch.backends.cpu.get_cpu_capability()}")
    if forced:
        text += "; forced: " + ", ".join(f"{k}={v}" for k, v in forced.items())
    lib = "built" if native.gemv_library() is not None else "NOT built (no `gemv` path)"
    return text + f"; autoq GEMV library {lib}"


# --------------------------------------------------------------------------------------------
# torchao, when installed
# --------------------------------------------------------------------------------------------

TORCHAO_NOTE = ""


def torchao_configs() -> dict[str, Callable[[], object]]:
    """torchao's current CPU configs by the autoq format they match (empty without torchao)."""
    global TORCHAO_NOTE
    try:
        import torchao
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except Exception as err:  # noqa: BLE001 - any import failure means: no torchao column
        TORCHAO_NOTE = f"torchao column skipped: it does not import here ({type(err).__name__}: {err})."
        return {}
    configs: dict[str, Callable[[], object]] = {
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "int8_weight_only": Int8WeightOnlyConfig,
        # torchao 0.18 has no CPU int4 layout any more (the default needs the mslk CUDA kernels):
        # the cell then names the error.
        "int4_g128": lambda: Int4WeightOnlyConfig(group_size=128),
    }
    TORCHAO_NOTE = (f"torchao {torchao.__version__}: `Int8DynamicActivationInt8WeightConfig()`, "
                    "`Int8WeightOnlyConfig()`, `Int4WeightOnlyConfig(group_size=128)` on an fp32 `nn.Linear`,"
                    " fp32 activations; a cell naming an error: the config does not run on CPU.")
    return configs


def torchao_module(config_factory: Callable[[], object], weight: torch.Tensor,
                   bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """A torchao-quantized ``nn.Linear``, or why it could not be built."""
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    try:
        quantize_(linear, config_factory())
        linear(torch.randn(1, weight.shape[1]))
    except Exception as err:  # noqa: BLE001
        return f"fails: {type(err).__name__}"
    return linear


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------


def table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def cell(ms: float, fp32: float) -> str:
    return f"{ms:.3f} ({fp32 / ms:.2f}x)"


def path_table(torchao: dict) -> tuple[list[str], list[list[str]]]:
    """Every candidate path at 4096x4096, M = 1 and 32, fp32 activations."""
    n = k = 4096
    weight = torch.randn(n, k) * 0.02
    bias = torch.randn(n) * 0.01
    rows = []
    for m in (1, 32):
        x = torch.randn(m, k)
        for fmt in PATH_FORMATS:
            module = quantize_layer(weight, bias, fmt)
            kernel = type(module.format).kernels["native"]
            prepared = kernel.prepare(module.quantized_weight())
            candidates = kernel.candidates(prepared, m, cpu.cpu_isa())
            calls: dict[str, Callable[[], object]] = {"fp32": lambda x=x: F.linear(x, weight, bias)}
            for path in candidates:
                calls[path] = lambda path=path, x=x, kernel=kernel, prepared=prepared: kernel.run(path, x, prepared)
            ao = torchao.get(fmt)
            ao_module = torchao_module(ao, weight, bias) if ao else None
            if callable(ao_module):
                calls["torchao"] = lambda x=x, mod=ao_module: mod(x)
            module(x)  # the kernel's own choice (timed once, or from the cache)
            picked = kernel.choose_path(x, prepared)
            times = interleaved_ms(calls)
            fp32 = times.pop("fp32")
            ao_text = cell(times.pop("torchao"), fp32) if "torchao" in times else (ao_module or "n/a")
            paths = ", ".join(f"{p} {cell(t, fp32)}" for p, t in times.items())
            rows.append([str(m), fmt, f"{fp32:.3f}", paths, f"{picked} ({fp32 / times[picked]:.2f}x)", ao_text])
            print(" | ".join(rows[-1]), flush=True)
    return ["M", "format", "fp32 ms", "paths: ms (speedup vs fp32)", "picked", "torchao"], rows


def format_table(shapes: dict[str, tuple[int, int]], torchao: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    header = ["shape (N x K)", "M", "fp32", "bf16", *QUANTIZED, *(f"torchao {f}" for f in torchao)]
    rows: list[list[str]] = []
    sizes: list[list[str]] = []
    for name, (n, k) in shapes.items():
        weight = torch.randn(n, k) * 0.02
        bias = torch.randn(n) * 0.01
        weight_bf16, bias_bf16 = weight.bfloat16(), bias.bfloat16()
        modules = {fmt: quantize_layer(weight, bias, fmt) for fmt in QUANTIZED}
        ao_modules = {fmt: torchao_module(factory, weight, bias) for fmt, factory in torchao.items()}
        sizes.append([name, f"{weight.numel() * 4 / 1e6:.2f}", f"{weight.numel() * 2 / 1e6:.2f}"]
                     + [f"{weight_bytes(m) / 1e6:.2f}" for m in modules.values()])
        for m in M_VALUES:
            x = torch.randn(m, k)
            x_bf16 = x.bfloat16()
            calls: dict[str, Callable[[], object]] = {
                "fp32": lambda x=x, w=weight, b=bias: F.linear(x, w, b),
                "bf16": lambda x=x_bf16, w=weight_bf16, b=bias_bf16: F.linear(x, w, b),
            }
            for fmt, module in modules.items():
                calls[fmt] = lambda x=x, module=module: module(x)
            for fmt, module in ao_modules.items():
                if callable(module):
                    calls[f"torchao {fmt}"] = lambda x=x, module=module: module(x)
            times = interleaved_ms(calls, min_time=0.3, max_rounds=15)
            fp32 = times["fp32"]
            cells = [name, str(m), f"{fp32:.3f}"]
            for column in header[3:]:
                if column in times:
                    cells.append(cell(times[column], fp32))
                else:
                    cells.append(str(ao_modules.get(column.removeprefix("torchao "), "n/a")))
            rows.append(cells)
            print(" | ".join(cells), flush=True)
    return header, rows, sizes


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name != "bias")


def minilm_plan() -> str:
    """The MiniLM balanced 6-bit plan's forward at batch 32x64 and 1x64 vs fp32 eager."""
    import copy

    import autoq
    from autoq.models import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model("bundled:minilm")
    model.eval()
    batches = autoq.calibration.text_batches(autoq.calibration.bundled_texts(), tokenizer)
    t0 = time.perf_counter()
    plan = autoq.search(model, batches, effective_bits=6.0, objective="balanced")
    search_s = time.perf_counter() - t0
    quantized = autoq.apply(copy.deepcopy(model), plan)
    counts: dict[str, int] = {}
    for layer in plan.layers.values():
        counts[layer.format] = counts.get(layer.format, 0) + 1
    lines = [f"Plan: {', '.join(f'{f} x{c}' for f, c in sorted(counts.items()))} (search {search_s:.1f} s)."]
    rows = []
    with torch.inference_mode():
        for batch, seq in ((32, 64), (1, 64)):
            ids = torch.randint(1000, 20000, (batch, seq))
            mask = torch.ones_like(ids)
            times = interleaved_ms({"fp32": lambda ids=ids, mask=mask: model(input_ids=ids, attention_mask=mask),
                                    "plan": lambda ids=ids, mask=mask: quantized(input_ids=ids, attention_mask=mask)},
                                   min_time=2.0, max_rounds=30)
            rows.append([f"{batch}x{seq}", f"{times['fp32']:.2f}", f"{times['plan']:.2f}",
                         f"{times['fp32'] / times['plan']:.2f}x"])
            print(" | ".join(rows[-1]), flush=True)
    return "\n".join(lines + ["", table(["batch x seq", "fp32 eager ms", "plan ms", "speedup"], rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM shapes and 4096x4096 only in the format table")
    parser.add_argument("--minilm", action="store_true", help="also time the MiniLM balanced 6-bit plan")
    parser.add_argument("--isa", choices=sorted(FORCED_ISA_ENV), help="imitate a smaller CPU (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--paths-only", action="store_true", help="only the 4096x4096 path table")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="min: the best round, for a machine so loaded that medians measure the load")
    parser.add_argument("--out", default=None, help="default: bench/results/formats-cpu-<isa>.md")
    args = parser.parse_args()
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("MiniLM") or "4096x4096" in k}
    isa = cpu.cpu_isa()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"formats-cpu-{isa.name}.md"
    description = machine()
    print(f"Machine: {description}", flush=True)

    torch.manual_seed(0)
    torchao = torchao_configs()
    with torch.no_grad():
        path_head, path_rows = path_table(torchao)
        head, rows, sizes = format_table({} if args.paths_only else shapes, torchao)
    minilm = minilm_plan() if args.minilm else None

    text = "\n".join([
        f"# autoq formats on CPU: {isa.name}" + (" (forced)" if isa.forced else ""),
        "",
        f"Machine: {description}.",
        "",
        "Command: `.venv/bin/python bench/formats_cpu.py " + " ".join(sys.argv[1:]) + f"`. {args.stat.capitalize()}"
        " ms per call over interleaved rounds (one call of each contender per round), fp32 activations; speedup vs"
        " fp32 `F.linear` in brackets. The machine is a shared 2-core VM: absolute times are noisy,"
        " the ratios within one row are the figures.",
        "",
        TORCHAO_NOTE,
        "",
        "## Paths at 4096x4096 (every candidate for this ISA; `picked`: the kernel's timed choice)",
        "",
        table(path_head, path_rows),
        "",
        *(["## Formats (`module(x)`, the picked path)", "", table(head, rows), ""] if rows else []),
        *(["## MiniLM balanced 6-bit plan, forward vs fp32 eager", "", minilm, ""] if minilm else []),
        *(["## Weight bytes (MB; quantized formats include scales and zero points, not the bias)", "",
           table(["shape (N x K)", "fp32", "bf16", *QUANTIZED], sizes), ""] if sizes else []),
    ])
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
