"""Compile the Triton kernels for sm_80 and sm_90 on a machine without a GPU, and check them.

Triton lowers a kernel to PTX and a cubin for a named target without a driver (``ptxas``,
``cuobjdump`` and ``nvdisasm`` ship in the triton wheel). For each compile this reports the
registers, shared memory (total, and per pipeline stage), local-memory spills, the tensor-core
instruction used, and for the GEMV kernels the SASS instructions per weight in the main loop.

    python -m autoq.kernels.aot [--all] [--out bench/results/kernels-aot.md]

By default it compiles every *default* configuration (``tuning.default_config``: what runs when
tuning is off) in bf16, fp16 and fp32, plus a small deterministic sample of the tuner's other
candidates; ``--all`` compiles every candidate the tuner can pick (``tuning.candidates`` over the
M buckets, the shapes and group sizes below) in bf16 and fp16 — a long sweep, not for CI.

It exits non-zero, naming each problem, when a kernel does not compile, when a default
configuration needs more shared memory than a block gets or spills registers to local memory,
or when a default GEMV main loop (bf16 / fp16) exceeds its instruction budget per weight.

Instructions per weight: SASS instructions in the loop body (one iteration, per thread) divided by
the weights one thread handles per iteration (``BLOCK_N * BLOCK_K / (32 * num_warps)``). A
multiprocessor issues 4 warp-instructions per clock, so H200 (132 SMs, ~1.98 GHz) issues about
33e12 thread-instructions/s; streaming int4 weights at 4.8 TB/s is 9.6e12 weights/s, so more
than ~3.5 instructions per weight caps an int4 GEMV below the HBM bandwidth (int8: ~7).

Runs in worker processes (one per CPU); Triton's on-disk cache makes a rerun fast. Must run
without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` does not compile).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from autoq.kernels import tuning
from autoq.kernels.tuning import KernelConfig, Traits

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K) of Llama-style linears
GROUP_SIZES = (32, 64, 128)
# SASS instructions per weight allowed in a default GEMV main loop with 16-bit activations (fp32
# activations take the plain fp32 path: reported, not held to it). See the module docstring.
GEMV_BUDGET = 2.5  # SASS instructions per weight, for the weight-only kernels' GEMV
SAMPLE_SIZE = 8  # non-default candidates compiled by the default (CI) run
TENSOR_CORE_OPS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Job:
    """One compile: one Triton kernel (by its traits) in one configuration, activation dtype and
    target."""

    kind: Traits  # the traits of INT4, INT8_WEIGHT_ONLY or INT8_DYNAMIC (triton_backend)
    config: KernelConfig
    dtype: str  # "bf16", "fp16" or "fp32"
    arch: int
    group_size: int | None = None
    default: bool = False

    @property
    def label(self) -> str:
        c = self.config
        if c.kernel == "dequant":
            text = "dequant"
        elif c.kernel == "quantize":
            text = "quantize rows"
        elif c.kernel == "gemv":
            text = f"gemv n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps}"
        else:
            text = (f"mm m{c.block_m} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} "
                    f"st{c.num_stages}")
        return text + (f" g{self.group_size}" if self.group_size else "")

    def sort_key(self) -> tuple:
        return (self.kind.name, self.config.kernel, self.label, self.dtype, self.arch)


@dataclass(frozen=True)
class KernelSource:
    """What to hand ``triton.compile``: the function and its typed arguments."""

    fn: object  # a @triton.jit function
    pointers: dict[str, str]  # pointer argument -> element type ("bf16", "i32", ...)
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    weights_per_iteration: int = 0  # GEMV: weights one program handles per main-loop iteration
    unaligned: tuple[str, ...] = ()  # integer arguments not known to be multiples of 16


@dataclass
class Result:
    job: Job
    error: str | None = None
    registers: int = 0
    stack: int = 0  # bytes of stack frame
    spills: int = 0  # local-memory stores and loads (STL / LDL) in the SASS
    shared: int = 0  # bytes of shared memory per block
    shared_per_stage: int = 0  # bytes staged in shared memory per K step (see stage_bytes)
    tensor_core: str = ""
    loop_instructions: int = 0
    per_weight: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Which compiles
# --------------------------------------------------------------------------------------------


def kinds() -> list[Traits]:
    from autoq.kernels import triton_backend as tb

    return [kernel.traits for kernel in (tb.INT8_DYNAMIC, tb.INT8_WEIGHT_ONLY, tb.INT4)]


def _compile_identity(job: Job) -> tuple:
    """Jobs with equal identities compile the same code (block_m / group_m unused by a GEMV)."""
    c = job.config
    if c.kernel == "gemv":
        c = replace(c, block_m=1, group_m=1)
    return (job.kind, c, job.dtype, job.arch, job.group_size)


def all_jobs(archs: Iterable[int] = ARCHS) -> list[Job]:
    """Every compile the tuner can need, defaults marked; sorted, without duplicates."""
    jobs: dict[tuple, Job] = {}

    def add(job: Job) -> None:
        key = _compile_identity(job)
        if key not in jobs or (job.default and not jobs[key].default):
            jobs[key] = job

    for traits in kinds():
        groups = GROUP_SIZES if traits.grouped else (None,)
        for arch in archs:
            for group in groups:
                if not traits.weight_only:  # per-token quantization runs before every int8 GEMM
                    quantize = KernelConfig("quantize", 1, 0, 0, 1, 1, 8, 1)
                    for dtype in _DTYPES:
                        add(Job(traits, quantize, dtype, arch, None, True))
                for n, k in SHAPES:
                    for m in tuning.M_BUCKETS:
                        for dtype, torch_dtype in _DTYPES.items():
                            default = tuning.default_config(traits, m, n, k, group, torch_dtype)
                            add(Job(traits, default, dtype, arch, group, True))
                        for config in tuning.candidates(traits, m, k, group):
                            for dtype in ("bf16", "fp16"):
                                add(Job(traits, config, dtype, arch, group, False))
    return sorted(jobs.values(), key=Job.sort_key)


def default_jobs(archs: Iterable[int] = ARCHS, sample: int = SAMPLE_SIZE) -> list[Job]:
    """The CI set: every default job, plus ``sample`` others picked by a stable hash."""
    jobs = all_jobs(archs)
    others = [job for job in jobs if not job.default]
    others.sort(key=lambda job: hashlib.sha1(repr(job.sort_key()).encode()).hexdigest())
    return sorted([job for job in jobs if job.default] + others[:sample], key=Job.sort_key)


def kernel_source(job: Job) -> KernelSource:
    """The kernel and the arguments the Python wrapper would launch it with."""
    from autoq.kernels import triton_int4, triton_int8

    c, act = job.config, job.dtype
    dtype = _DTYPES[act]
    if job.kind.grouped:
        ptrs = {"x_ptr": act, "qw_ptr": "i32", "s_ptr": "fp16", "z_ptr": "u8", "bias_ptr": act,
                "y_ptr": act, "sum_ptr": "fp32", "count_ptr": "i32"}
        if c.kernel == "gemv":
            return KernelSource(triton_int4._int4_gemv_kernel, ptrs,
                                triton_int4.gemv_constexprs(c, job.group_size, False, dtype, True),
                                c.num_warps, c.num_stages, c.block_n * c.block_k)
        if c.kernel == "mm":
            return KernelSource(triton_int4._int4_mm_kernel, ptrs,
                                triton_int4.mm_constexprs(c, job.group_size, False, dtype),
                                c.num_warps, c.num_stages, unaligned=("M",))
        return KernelSource(triton_int4._int4_dequantize_kernel,
                            {"qw_ptr": "i32", "s_ptr": "fp16", "z_ptr": "u8", "out_ptr": act},
                            {"GROUP_SIZE": job.group_size, **triton_int4.DEQUANT_BLOCKS}, 4, 3)
    w_ptrs = {"x_ptr": act, "w_ptr": "i8", "s_ptr": "fp32", "bias_ptr": act, "y_ptr": act,
              "sum_ptr": "fp32", "count_ptr": "i32"}
    if c.kernel == "gemv":
        packed = act != "fp32"  # what the wrapper runs for in-bounds, aligned shapes
        kernel = triton_int8._int8_gemv_packed_kernel if packed else triton_int8._int8_gemv_kernel
        return KernelSource(kernel, w_ptrs, triton_int8.gemv_constexprs(c, False, packed, dtype),
                            c.num_warps, c.num_stages, c.block_n * c.block_k)
    if c.kernel == "dequant":
        return KernelSource(triton_int8._int8_dequantize_kernel,
                            {"w_ptr": "i8", "s_ptr": "fp32", "out_ptr": act},
                            dict(triton_int8.DEQUANT_BLOCKS), 4, 3)
    if c.kernel == "quantize":
        return KernelSource(triton_int8._quantize_rows_kernel,
                            {"x_ptr": act, "q_ptr": "i8", "s_ptr": "fp32"},
                            {"BLOCK_K": triton_int8.QUANTIZE_BLOCK_K}, c.num_warps, 3)
    if not job.kind.weight_only:
        return KernelSource(triton_int8._int8_dynamic_mm_kernel,
                            {"xq_ptr": "i8", "xs_ptr": "fp32", "w_ptr": "i8", "ws_ptr": "fp32",
                             "bias_ptr": act, "y_ptr": act, "sum_ptr": "fp32",
                             "count_ptr": "i32"},
                            triton_int8.dynamic_mm_constexprs(c, False),
                            c.num_warps, c.num_stages, unaligned=("M",))
    return KernelSource(triton_int8._int8_weight_only_mm_kernel, w_ptrs,
                        triton_int8.weight_only_mm_constexprs(c, False, dtype),
                        c.num_warps, c.num_stages, unaligned=("M",))


# --------------------------------------------------------------------------------------------
# Compiling and reading the binary
# --------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    from triton import knobs

    return str(Path(knobs.nvidia.cuobjdump.path).with_name(name))


def compile_source(source: KernelSource, arch: int):
    """``triton.compile`` for ``sm_<arch>``: pointers and integers (except ``unaligned``) are
    declared 16-aligned, as the JIT specializes them for real shapes such as 4096 x 14336."""
    import triton
    import triton.compiler
    from triton.backends.compiler import GPUTarget

    fn = source.fn
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in source.constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = "*" + source.pointers[name] if name in source.pointers else "i32"
        if name not in source.unaligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=source.constexprs,
                                    attrs=attrs)
    options = {"num_warps": source.num_warps, "num_stages": source.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def sass_instructions(cubin: bytes) -> tuple[list[str], dict[str, int]]:
    """The SASS instructions of a cubin (``nvdisasm``) and the index each label points at."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("nvdisasm"), "-c", f.name], check=True,
                              capture_output=True, text=True).stdout
    instructions: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"^(\.L_x_\d+):", line):
            labels[match.group(1)] = len(instructions)
        elif match := re.match(r"^/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instructions.append(match.group(1))
    return instructions, labels


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.128 R4, ...`` -> ``LDG.E.128``."""
    parts = instruction.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def main_loop(instructions: list[str], labels: dict[str, int]) -> list[str]:
    """The body of the longest loop (a backward branch) that loads from global memory."""
    best: list[str] = []
    for end, instruction in enumerate(instructions):
        match = re.search(r"BRA\s+`\((\.L_x_\d+)\)", instruction)
        if match is None or labels.get(match.group(1), end + 1) > end:
            continue
        body = instructions[labels[match.group(1)]:end + 1]
        if any(opcode(i).startswith("LDG") for i in body) and len(body) > len(best):
            best = body
    return best


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(registers.group(1)) if registers else 0, int(stack.group(1)) if stack else 0


_BITS = {"i1": 8, "i8": 8, "i16": 16, "i32": 32, "i64": 64, "f16": 16, "bf16": 16, "f32": 32,
         "f64": 64}


def stage_bytes(ttgir: str) -> int:
    """Shared memory per pipeline stage: one slot of each ring buffer the software pipeliner
    allocates for a loop's loads (``local_alloc : () -> memdesc<S x ...>``, S slots). Buffers
    allocated once (a register tile staged for a dot, say) are in the total only."""
    total = 0
    for line in ttgir.splitlines():
        match = re.search(r"ttg\.local_alloc\s*:\s*\(\)\s*-> !ttg\.memdesc<([0-9x]+)x([a-z0-9]+),",
                          line)
        if match is None:
            continue
        dims = [int(d) for d in match.group(1).split("x")]
        if len(dims) > 1:
            total += math.prod(dims[1:]) * _BITS.get(match.group(2), 32) // 8
    return total


def _describe(err: BaseException) -> str:
    """One line for a compile error: its kind, where, and the cause Triton wraps."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip(" ^")]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    if len(lines) > 1:
        text += f" {lines[-1]}"  # Triton puts the reason last, after the source excerpt
    if err.__cause__ is not None:
        text += f" ({type(err.__cause__).__name__}: {str(err.__cause__).splitlines()[0]})"
    return text.replace("|", "/")[:300]


def compile_job(job: Job, source_for: Callable[[Job], KernelSource] = kernel_source) -> Result:
    """Compile one job and read its figures; a compile error is returned, not raised."""
    start = time.perf_counter()
    result = Result(job)
    try:
        source = source_for(job)
        compiled = compile_source(source, job.arch)
    except Exception as err:  # noqa: BLE001 - any compiler failure is a finding to report
        result.error = _describe(err)
        result.seconds = time.perf_counter() - start
        return result
    cubin = compiled.asm["cubin"]
    instructions, labels = sass_instructions(cubin)
    ops = [opcode(i) for i in instructions]
    result.registers, result.stack = resource_usage(cubin)
    result.spills = sum(op.startswith(("STL", "LDL")) for op in ops)
    result.shared = int(compiled.metadata.shared)
    result.shared_per_stage = stage_bytes(compiled.asm["ttgir"])
    found = {name for op in ops for name in TENSOR_CORE_OPS if op.startswith(name)}
    result.tensor_core = "/".join(sorted(found))
    if source.weights_per_iteration:
        loop = main_loop(instructions, labels)
        result.loop_instructions = len(loop)
        per_thread = source.weights_per_iteration / (32 * source.num_warps)
        result.per_weight = len(loop) / per_thread if loop else None
    result.seconds = time.perf_counter() - start
    return result


def problems(result: Result, budget: float = GEMV_BUDGET) -> list[str]:
    """What is wrong with one compile (empty when nothing is)."""
    job = result.job
    where = f"{job.kind.name} {job.label} {job.dtype} sm_{job.arch}"
    if result.error:
        return [f"{where}: does not compile: {result.error}"]
    out = []
    if job.default:
        if result.shared > SHARED_LIMIT[job.arch]:
            out.append(f"{where}: default config needs {result.shared} bytes of shared memory, "
                       f"over the {SHARED_LIMIT[job.arch]} a block gets on sm_{job.arch}")
        if result.spills:
            out.append(f"{where}: default config spills registers ({result.spills} local-memory "
                       f"accesses, {result.stack}-byte stack)")
        limit = budget if job.kind.weight_only else None
        if job.config.kernel == "gemv" and limit is not None and job.dtype != "fp32":
            if result.per_weight is None:
                out.append(f"{where}: no GEMV main loop found in the SASS")
            elif result.per_weight > limit:
                out.append(f"{where}: GEMV main loop takes {result.per_weight:.2f} SASS "
                           f"instructions per weight, over the budget of {limit}")
    return out


def run_jobs(jobs: list[Job], workers: int | None = None,
             source_for: Callable[[Job], KernelSource] = kernel_source) -> list[Result]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) == 1:
        return [compile_job(job, source_for) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs, [source_for] * len(jobs)))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def markdown(results: list[Result], title: str, seconds: float) -> str:
    import triton

    lines = [
        f"# Triton kernels compiled for sm_80 / sm_90 without a GPU ({title})",
        "",
        f"triton {triton.__version__}; `python -m autoq.kernels.aot"
        f"{' --all' if title == 'all candidates' else ''}`; {len(results)} compiles in "
        f"{seconds:.0f} s on {os.cpu_count()} CPUs. *default* = `tuning.default_config` "
        "(runs when tuning is off); smem = shared memory per block; smem/stage = one slot of the "
        "software pipeline's ring buffers (the loads of one K step); spills = STL/LDL "
        "instructions; tc = tensor-core instruction in the SASS; instr/weight = SASS instructions of the GEMV main loop per weight (per thread).",
        "",
        "| kernel | config | default | dtype | arch | regs | smem KiB | smem/stage KiB | spills "
        "| tc | instr/weight |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        job = r.job
        if r.error:
            lines.append(f"| {job.kind.name} | {job.label} | {'yes' if job.default else ''} | "
                         f"{job.dtype} | sm_{job.arch} | FAILED: {r.error} | | | | | |")
            continue
        per_weight = f"{r.per_weight:.2f}" if r.per_weight is not None else ""
        lines.append(
            f"| {job.kind.name} | {job.label} | {'yes' if job.default else ''} | {job.dtype} | "
            f"sm_{job.arch} | {r.registers} | {_kib(r.shared)} | {_kib(r.shared_per_stage)} | "
            f"{r.spills} | {r.tensor_core or '-'} | {per_weight} |")
    found = [p for r in results for p in r.problems]
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in found] or ["none"])
    return "\n".join(lines[:4] + summary(results) + lines[4:]) + "\n"


def summary(results: list[Result]) -> list[str]:
    """Headline figures of the default configs: the GEMV loops' instructions per weight, and
    the int4 GEMM's shared memory per stage next to the int8 weight-only GEMM's (same tile)."""
    ok = [r for r in results if r.error is None and r.job.default]
    out = ["## Summary (default configs)", "",
           "| GEMV main loop, SASS instructions per weight (worst default) | sm_80 | sm_90 |",
           "|---|---:|---:|"]
    for kind in (k for k in kinds() if k.weight_only):
        for dtype in ("bf16", "fp16", "fp32"):
            cells = []
            for arch in ARCHS:
                values = [r.per_weight for r in ok if r.job.kind == kind and r.job.arch == arch
                          and r.job.dtype == dtype and r.per_weight is not None]
                cells.append(f"{max(values):.2f}" if values else "")
            if any(cells):
                note = f" (budget {GEMV_BUDGET})" if dtype != "fp32" else " (plain path)"
                out.append(f"| {kind.name} {dtype}{note} | " + " | ".join(cells) + " |")
    out += ["", "| GEMM tile (bf16) | arch | int4 smem/stage KiB (worst group) | "
            "int8_weight_only smem/stage KiB | int4 smem KiB | int8_weight_only smem KiB |",
            "|---|---|---:|---:|---:|---:|"]

    def tile(job: Job) -> tuple:
        c = job.config
        return (c.block_m, c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages)

    int8 = {(tile(r.job), r.job.arch): r for r in ok if r.job.kind.weight_only and not r.job.kind.grouped
            and r.job.config.kernel == "mm" and r.job.dtype == "bf16"}
    seen = set()
    for r in ok:
        key = (tile(r.job), r.job.arch)
        if (not r.job.kind.grouped or r.job.config.kernel != "mm" or r.job.dtype != "bf16"
                or key not in int8 or key in seen):
            continue
        seen.add(key)
        same = [o for o in ok if o.job.kind.grouped and o.job.dtype == "bf16"
                and (tile(o.job), o.job.arch) == key]
        worst = max(same, key=lambda o: o.shared_per_stage)
        m, n, k, split, warps, stages = key[0]
        out.append(f"| m{m} n{n} k{k} s{split} w{warps} st{stages} | sm_{key[1]} | "
                   f"{_kib(worst.shared_per_stage)} | {_kib(int8[key].shared_per_stage)} | "
                   f"{_kib(max(o.shared for o in same))} | {_kib(int8[key].shared)} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true",
                        help="every candidate config (long), not the defaults plus a sample")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--only", default=None,
                        help="regular expression on 'kernel label dtype': compile those only")
    parser.add_argument("--sample", type=int, default=SAMPLE_SIZE,
                        help="non-default candidates in the default run")
    parser.add_argument("--budget", type=float, default=None,
                        help="override the GEMV budget (SASS instructions per weight)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, minus its warning
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET: under the interpreter kernels do not compile",
              file=sys.stderr)
        return 2

    jobs = all_jobs(args.arch) if args.all else default_jobs(args.arch, args.sample)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, f"{j.kind.name} {j.label} {j.dtype}")]
    budget = GEMV_BUDGET if args.budget is None else args.budget
    start = time.perf_counter()
    results = run_jobs(jobs, args.workers)
    seconds = time.perf_counter() - start
    for r in results:
        r.problems = problems(r, budget)
    text = markdown(results, "all candidates" if args.all else "defaults + sample", seconds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    found = [p for r in results for p in r.problems]
    print(f"aot: {len(results)} compiles in {seconds:.0f} s, {len(found)} problem(s)")
    for p in found:
        print(f"aot: FAIL {p}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
