"""Time autoq's Triton kernels against PyTorch's GPU kernels on Llama Linear shapes.

For every (N x K) shape and M: bf16 ``F.linear`` (cuBLAS), our ``int8_dynamic``,
``int8_weight_only`` and ``int4_g{G}`` (tuned configs, as a model would run them), PyTorch's
tinygemm ``aten._weight_int4pack_mm`` (bf16, same G), ``torch._int_mm`` (the int8 matmul alone: no
activation quantization, no scales; needs M > 16) and dequantize-then-cuBLAS for both weight-only
formats. Times are medians of ``triton.testing.do_bench``, which clears L2 (writes a 256 MB buffer)
before every run. For M = 1 it also reports the fraction of the memory roofline reached: bytes
moved divided by time, over the measured device-to-device copy bandwidth.

Prints markdown and writes it to ``bench/results/kernels-<gpu>.md``. The first run tunes every
(shape, M bucket) — minutes; the choices are cached (see ``autoq/kernels/tuning.py``).

    .venv/bin/python bench/kernels.py [--group-size 128] [--ms 1 16 2048] [--no-tune]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]  # (N, K)
M_VALUES = [1, 4, 16, 64, 256, 2048]
COLUMNS = ["bf16", "int8_dynamic", "_int_mm", "int8_weight_only", "int8 deq+cuBLAS",
           "int4", "tinygemm", "int4 deq+cuBLAS"]
# Targets the kernels were written for (reported, not asserted).
TARGETS = """\
- M=1 int4 >= 3.0x bf16 at 4096x14336, and >= 1.1x tinygemm
- M=1 int4 >= 80% of copy bandwidth at 14336x4096
- M=1 int8_weight_only >= 1.7x bf16
- M<=16 int4 >= 2.5x bf16
- M=2048 int8_dynamic >= 1.4x bf16"""


def median_us(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def copy_bandwidth(rep_ms: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), rep_ms)
    return 2 * (1 << 30) / (us * 1e-6)


class Layer:
    """One (N, K) weight in every representation the benchmark times."""

    def __init__(self, n: int, k: int, group_size: int):
        from autoq.formats import QuantizedWeight
        from autoq.kernels import triton_backend as tb
        from autoq.primitives import pack_int4

        g = torch.Generator(device="cuda").manual_seed(0)
        self.n, self.k, self.group_size = n, k, group_size
        self.bias = None
        self.w_bf16 = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)

        q8 = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
        s8 = torch.rand(n, device="cuda", generator=g) * 1e-3 + 1e-4
        self.int8 = QuantizedWeight(q8, s8, None, n, k)
        self.int8_prepared = tb.INT8_WEIGHT_ONLY.prepare(self.int8)

        q4 = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.uint8)
        zp = torch.randint(0, 16, (n, k // group_size), device="cuda", generator=g,
                           dtype=torch.uint8)
        s4 = (torch.rand(n, k // group_size, device="cuda", generator=g) * 2e-3 + 1e-4).half()
        self.int4 = QuantizedWeight(pack_int4(q4), s4, zp, n, k, group_size)
        self.int4_prepared = tb.INT4.prepare(self.int4)

        # tinygemm: uint8 [N, K/2] with the even element in the high nibble, inner_k_tiles=8;
        # w = (q - 8) * scale + zero, so zero = (8 - zp) * scale; [K/G, N, 2] bf16.
        q32 = q4.to(torch.int32)
        self.tinygemm_weight = torch.ops.aten._convert_weight_to_int4pack(
            ((q32[:, ::2] << 4) | q32[:, 1::2]).to(torch.uint8), 8)
        scale = s4.float()
        zero = (8.0 - zp.float()) * scale
        self.tinygemm_scale_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(
            torch.bfloat16)

    def bytes_at_m1(self, column: str) -> int | None:
        """Bytes a kernel must move at M = 1: weight (+ scales / zeros) + x + y, all bf16 I/O."""
        n, k, groups = self.n, self.k, self.n * self.k // self.group_size
        io = 2 * k + 2 * n
        return {
            "bf16": 2 * n * k + io,
            "int8_weight_only": n * k + 4 * n + io,
            "int4": n * k // 2 + 3 * groups + io,  # fp16 scale + uint8 zero point per group
            "tinygemm": n * k // 2 + 4 * groups + io,  # bf16 scale + bf16 zero per group
        }.get(column)

    def runners(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor] | None]:
        from autoq.kernels import triton_backend as tb
        from autoq.kernels.tuning import DEQUANT

        int8_dynamic = tb.INT8_DYNAMIC.prepare(self.int8)
        xq = torch.randint(-127, 128, x.shape, device="cuda", dtype=torch.int8)
        return {
            "bf16": lambda: F.linear(x, self.w_bf16),
            "int8_dynamic": lambda: tb.INT8_DYNAMIC.linear(x, int8_dynamic, None),
            "_int_mm": (lambda: torch._int_mm(xq, self.int8.qweight.t())) if x.shape[0] > 16
            else None,
            "int8_weight_only": lambda: tb.INT8_WEIGHT_ONLY.linear(x, self.int8_prepared, None),
            "int8 deq+cuBLAS": lambda: tb.INT8_WEIGHT_ONLY.run(x, self.int8_prepared, None, DEQUANT),
            "int4": lambda: tb.INT4.linear(x, self.int4_prepared, None),
            "tinygemm": lambda: torch.ops.aten._weight_int4pack_mm(
                x, self.tinygemm_weight, self.group_size, self.tinygemm_scale_zeros),
            "int4 deq+cuBLAS": lambda: tb.INT4.run(x, self.int4_prepared, None, DEQUANT),
        }

    def max_errors(self, x: torch.Tensor, runners: dict) -> dict[str, float]:
        """Relative max error of each quantized result against the reference backend."""
        from autoq import formats

        int4 = formats.get(f"int4_g{self.group_size}")
        expected = {
            "int8_dynamic": formats.get("int8_dynamic").reference_linear(x, self.int8, None),
            "int8_weight_only": formats.get("int8_weight_only").reference_linear(x, self.int8, None),
            "int4": int4.reference_linear(x, self.int4, None),
        }
        reference_of = {"int8_dynamic": "int8_dynamic", "int8_weight_only": "int8_weight_only",
                     "int8 deq+cuBLAS": "int8_weight_only", "int4": "int4",
                     "tinygemm": "int4", "int4 deq+cuBLAS": "int4"}
        errors = {}
        for column, kind in reference_of.items():
            ref = expected[kind].float()
            y = runners[column]().float()
            errors[column] = float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        return errors


LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "kv": 512, "layers": 16}  # Llama-3.2-1B
DECODE_FORMATS = ["bf16", "int8_weight_only", "int8_dynamic", "int4_g128"]


def decode_report(rep_ms: int) -> list[str]:
    """Decode tokens/s of the linear layers of a random-init Llama-1B-shaped stack per format
    (M = 1; q, k, v, o, gate, up, down per layer; attention left out), eager and replayed
    from a CUDA graph (which also shows that a step captures: nothing in it synchronises)."""
    import torch.nn as nn

    from autoq.modules import quantize_layer

    h, i, kv, n_layers = (LLAMA_1B[key] for key in ("hidden", "intermediate", "kv", "layers"))
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h),
              "down": (h, i)}
    g = torch.Generator(device="cuda").manual_seed(0)
    lines = ["", f"Decode, linear layers of a Llama-1B-shaped stack ({n_layers} layers, hidden {h}, "
             f"intermediate {i}; attention left out), M = 1, bf16 activations: tokens/s", "",
             "| format | eager tokens/s | CUDA graph tokens/s | vs bf16 (graph) |",
             "|---|---:|---:|---:|"]
    base = None
    for fmt in DECODE_FORMATS:
        try:
            layers = []
            for _ in range(n_layers):
                layer = {}
                for name, (n, k) in shapes.items():
                    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
                    if fmt == "bf16":
                        layer[name] = nn.Linear(k, n, bias=False, device="cuda",
                                                dtype=torch.bfloat16)
                        layer[name].weight.data.copy_(w)
                    else:
                        layer[name] = quantize_layer(w.float(), None, fmt)
                layers.append(layer)

            def step(x, layers=layers):
                for layer in layers:
                    layer["k"](x), layer["v"](x)  # launched, unused: attention is left out
                    x = x + layer["o"](layer["q"](x))
                    x = x + layer["down"](F.silu(layer["gate"](x)) * layer["up"](x))
                return x

            x = torch.randn(1, h, device="cuda", generator=g).to(torch.bfloat16)
            with torch.no_grad():
                step(x)  # compiles and prepares every layer
                eager_us = median_us(lambda x=x: step(x), rep_ms)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    step(x)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(x)
                graph_us = median_us(graph.replay, rep_ms)
            base = graph_us if fmt == "bf16" else base
            speedup = f"{base / graph_us:.2f}x" if base else ""
            lines.append(f"| {fmt} | {1e6 / eager_us:.0f} | {1e6 / graph_us:.0f} | {speedup} |")
        except Exception as err:  # noqa: BLE001 - report the failure, go on with the next format
            lines.append(f"| {fmt} | failed: {type(err).__name__}: {str(err)[:120]} | | |")
        print(lines[-1], flush=True)
        layers = None
        torch.cuda.empty_cache()
    return lines


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--ms", type=int, nargs="+", default=M_VALUES, help="values of M")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="subset of shapes as NxK, e.g. 4096x14336")
    parser.add_argument("--rep", type=int, default=100, help="do_bench time per measurement, ms")
    parser.add_argument("--no-tune", action="store_true",
                        help="use the default kernel configs instead of tuning (AUTOQ_AUTOTUNE=0)")
    parser.add_argument("--out", type=Path, default=None, help="markdown output path")
    parser.add_argument("--decode", action="store_true",
                        help="also time decode tokens/s of a Llama-1B-shaped stack per format")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
                 "(The kernels' correctness tests run on CPU: "
                 "TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: under the interpreter the timings mean nothing")
    try:
        import triton
    except ImportError:
        sys.exit("bench/kernels.py needs triton: pip install 'autoq[triton]'")
    if args.no_tune:
        os.environ["AUTOQ_AUTOTUNE"] = "0"
    else:  # prepare() tunes the M buckets of these M values only
        os.environ.setdefault("AUTOQ_PRETUNE_M", ",".join(str(m) for m in args.ms))

    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    gpu = torch.cuda.get_device_name()
    group = args.group_size
    bandwidth = copy_bandwidth(args.rep)

    lines = [
        f"# autoq Triton kernels on {gpu}",
        "",
        f"- GPU: {gpu} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), "
        f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"{datetime.date.today().isoformat()}",
        f"- int4 = int4_g{group}; tinygemm = `aten._weight_int4pack_mm` (bf16, G={group}); "
        "`_int_mm` = int8 matmul only (no quantization, no scales; M > 16)",
        "- median µs per call (`triton.testing.do_bench`, L2 cleared before each run); "
        "speedup vs bf16 `F.linear` in brackets; activations bf16, no bias"
        + ("; default configs (no tuning)" if args.no_tune else "; tuned configs"),
        "",
        "| N x K | M | " + " | ".join(COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    roofline: list[str] = []
    results: dict[tuple[int, int, int, str], float] = {}
    worst_errors: dict[str, float] = {}
    for n, k in shapes:
        layer = Layer(n, k, group)
        for m in args.ms:
            x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.bfloat16)
            runners = layer.runners(x)
            try:
                for column, err in layer.max_errors(x, runners).items():
                    worst_errors[column] = max(worst_errors.get(column, 0.0), err)
            except Exception as err:  # noqa: BLE001 - report, then time what runs
                print(f"error check at {n}x{k} M={m} failed: {err}", file=sys.stderr)
            times = {}
            for column in COLUMNS:
                fn = runners[column]
                if fn is None:
                    continue
                try:
                    fn()  # compiles (our kernels were tuned when the layer was prepared)
                    times[column] = median_us(fn, args.rep)
                except Exception as err:  # noqa: BLE001 - one failing column must not end the run
                    print(f"{column} at {n}x{k} M={m} failed: {type(err).__name__}: {err}",
                          file=sys.stderr)
                    continue
                results[(n, k, m, column)] = times[column]
            base = times.get("bf16", float("nan"))
            cells = [f"{times[c]:.1f} ({base / times[c]:.2f}x)" if c in times else "n/a"
                     for c in COLUMNS]
            lines.append(f"| {n}x{k} | {m} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            if m == 1:
                parts = []
                for column in ("bf16", "int8_weight_only", "int4", "tinygemm"):
                    moved = layer.bytes_at_m1(column)
                    parts.append(f"{moved / (times[column] * 1e-6) / bandwidth:.0%}"
                                 if column in times else "n/a")
                roofline.append(f"| {n}x{k} | " + " | ".join(parts) + " |")
        del layer
        torch.cuda.empty_cache()

    tail_start = len(lines)
    if roofline:
        lines += ["", "M = 1: fraction of the measured copy bandwidth reached "
                  "(bytes of weight, scales, x and y / time)", "",
                  "| N x K | bf16 | int8_weight_only | int4 | tinygemm |",
                  "|---|---:|---:|---:|---:|",
                  *roofline]
    lines += ["", "Largest relative error vs the reference backend (max |y - ref| / max |ref|): "
              + ", ".join(f"{c} {e:.1e}" for c, e in worst_errors.items()),
              "", "Targets (not asserted):", TARGETS, "", target_report(results, shapes, args.ms,
                                                                         bandwidth, group)]
    if args.decode:
        lines += decode_report(args.rep)
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[tail_start:]))
    out = args.out or Path(__file__).parent / "results" / f"kernels-{gpu_slug(gpu)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")


def target_report(results: dict, shapes: list, ms: list[int], bandwidth: float,
                  group: int) -> str:
    """One line per target that the measured shapes and M values cover."""
    def speedup(n, k, m, column, versus="bf16"):
        if (n, k, m, column) in results and (n, k, m, versus) in results:
            return results[(n, k, m, versus)] / results[(n, k, m, column)]
        return None

    out = []
    checks = [
        ("M=1 int4 vs bf16 at 4096x14336", speedup(4096, 14336, 1, "int4"), 3.0),
        ("M=1 int4 vs tinygemm at 4096x14336", speedup(4096, 14336, 1, "int4", "tinygemm"), 1.1),
    ]
    if (14336, 4096, 1, "int4") in results:
        n, k = 14336, 4096
        moved = n * k // 2 + 3 * n * k // group + 2 * (n + k)
        checks.append(("M=1 int4 fraction of copy bandwidth at 14336x4096",
                       moved / (results[(n, k, 1, "int4")] * 1e-6) / bandwidth, 0.8))
    for n, k in shapes:
        checks.append((f"M=1 int8_weight_only vs bf16 at {n}x{k}",
                       speedup(n, k, 1, "int8_weight_only"), 1.7))
        for m in (m for m in ms if m <= 16):
            checks.append((f"M={m} int4 vs bf16 at {n}x{k}", speedup(n, k, m, "int4"), 2.5))
        checks.append((f"M=2048 int8_dynamic vs bf16 at {n}x{k}",
                       speedup(n, k, 2048, "int8_dynamic"), 1.4))
    for label, value, target in checks:
        if value is not None:
            mark = "met" if value >= target else "MISSED"
            shown = f"{value:.0%} (target {target:.0%})" if target < 1 else (
                f"{value:.2f}x (target {target}x)")
            out.append(f"- {label}: {shown} {mark}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
