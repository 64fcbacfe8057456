"""Search cost and memory as Llama checkpoints grow: streamed vs in memory vs a baseline checkout.

Random-init Llama checkpoints are written to disk (``--sizes``: 20m, 100m, 400m, 1b; bf16 for
1b, TinyLlama's shape) and searched with 8 batches of 2 x 128 token ids, each run in a fresh
process (its peak RSS is its own ``ru_maxrss``; "idle" is a process that only imports autoq):

- ``streamed``: ``autoq.search(DIR)``, the model read block by block;
- ``in memory``: ``from_pretrained`` then ``autoq.search(model)``;
- ``baseline``: the same in-memory search with another checkout of autoq (``--baseline PATH``,
  e.g. a ``git worktree`` of today's main) first on ``sys.path``.

Runs of one size are interleaved (streamed, in memory, baseline, then again for ``--rounds``)
and the median kept. The largest size is also exported streamed (``autoq quantize``'s path) and
loaded back with ``load_quantized`` and, in a process without autoq, with transformers.
``--depth`` adds the depth sweep: the 20m width with 4 and 16 layers, streamed.

Prints a markdown report (machine, table, the growth fitted to the streamed runs and what it
implies for 7B and 70B) and writes it to ``--out``.

    .venv/bin/python bench/scale.py --baseline /tmp/autoq-main --depth > bench/results/scale-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# name -> (hidden, layers, intermediate, heads, kv heads, dtype)
SIZES = {
    "20m": (256, 4, 768, 4, 4, "float32"),
    "100m": (768, 8, 2048, 12, 12, "float32"),
    "400m": (1024, 24, 2816, 16, 16, "float32"),
    "1b": (2048, 22, 5632, 32, 4, "bfloat16"),  # TinyLlama-1.1B's shape
}
VOCAB = 32000
BATCHES, BATCH, TOKENS = 8, 2, 128
# 7B and 70B Llama shapes (hidden, layers, intermediate, heads, kv heads), bf16
EXTRAPOLATE = {"7B": (4096, 32, 11008, 32, 32), "70B": (8192, 80, 28672, 64, 8)}


def block_params(hidden: int, inter: int, heads: int, kv: int) -> int:
    head_dim = hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden


def model_params(hidden: int, layers: int, inter: int, heads: int, kv: int) -> int:
    return layers * block_params(hidden, inter, heads, kv) + 2 * VOCAB * hidden + hidden


def make_checkpoint(path: Path, size: str, layers: int | None = None) -> Path:
    import torch
    import transformers

    hidden, n_layers, inter, heads, kv, dtype = SIZES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers or n_layers,
                                      intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                                      vocab_size=VOCAB, max_position_embeddings=TOKENS, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():  # random init, small enough that activations stay finite
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(path, max_shard_size="1GB")
    del model
    return path


def batches():
    import torch

    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)} for _ in range(BATCHES)]


# ----------------------------------------------------------------------------- child runs


def child(mode: str, path: str, cache: str, out: str | None) -> dict:
    """One measured run in this (fresh) process; prints its result as JSON."""
    start = time.perf_counter()
    import autoq

    result: dict = {"autoq": str(Path(autoq.__file__).parents[1])}
    if mode == "idle":
        pass
    elif mode.startswith("make-"):  # a checkpoint, built here so the driver's RSS stays small
        make_checkpoint(Path(path), *(mode.split("-")[1:2]), **({"layers": int(out)} if out else {}))
    elif mode == "export":
        from autoq.pipeline import quantize

        t = time.perf_counter()
        res = quantize(path, autoq.SearchConfig(cache_dir=cache), calibration=batches(), out_dir=out,
                       progress=False, stream=True)
        result.update(seconds=time.perf_counter() - t, bits=res.plan.effective_bits,
                      stage_seconds=res.plan.stage_seconds)
    elif mode == "load":
        import torch

        t = time.perf_counter()
        model = autoq.load_quantized(out)
        with torch.no_grad():
            logits = model(batches()[0]["input_ids"][:1, :32]).logits
        torch.save(logits, Path(out) / "autoq-logits.pt")
        result.update(seconds=time.perf_counter() - t, layers=len(autoq.layer_formats(model)))
    else:
        model, settings = path, {}
        if mode == "streamed-ray":  # the sensitivity pass on 2 local Ray workers, one core each
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            settings["workers"] = 2
        if mode in ("memory", "baseline"):
            import transformers

            t = time.perf_counter()
            model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            result["load_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = autoq.search(model, batches(), cache_dir=cache, progress=False, **settings)
        result.update(seconds=time.perf_counter() - t, stage_seconds=plan.stage_seconds,
                      bits=plan.effective_bits, plan=str(plan.save(Path(cache) / "plan.json")))
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["wall"] = time.perf_counter() - start
    return result


LOAD_WITHOUT_AUTOQ = """
import sys, torch, transformers
out = sys.argv[1]
assert "autoq" not in sys.modules
model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)[:1, :32]
with torch.no_grad():
    logits = model(ids).logits
ours = torch.load(out + "/autoq-logits.pt")
print((logits.float() - ours.float()).norm().item() / ours.float().norm().item())
assert "autoq" not in sys.modules
""".replace("VOCAB", str(VOCAB)).replace("BATCH", str(BATCH)).replace("TOKENS", str(TOKENS))


def spawn(mode: str, path: Path, cache: Path, *, root: Path = REPO, out: Path | str | None = None) -> dict:
    # AUTOQ_CACHE_DIR: each run's own, so no run finds the CPU kernel-path choices another timed
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "AUTOQ_CACHE_DIR": str(cache)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(path), str(cache),
               str(out or "")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run of {path.name} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["autoq"]).resolve() != root.resolve():
        raise RuntimeError(f"the {mode} run imported autoq from {result['autoq']}, not {root}")
    return result


# ----------------------------------------------------------------------------- report


def agreement(streamed: str, in_memory: str) -> str:
    """Whether two searches' statistics give the same plans at 5 and 6 bits when solved with one
    latency table (each run timed its own kernels; timing noise alone can move a balanced plan),
    and the Spearman correlation of their int4_sym_g128 scores."""
    from scipy.stats import spearmanr

    from autoq import api
    from autoq.plan import Plan

    a, b = Plan.load(streamed), Plan.load(in_memory)
    sa, sb = a.stats(), b.stats()
    names = [n for n in sb.layers if "int4_sym_g128" in sb.layers[n].sensitivity]
    rho = spearmanr([sa.layers[n].sensitivity["int4_sym_g128"] for n in names],
                    [sb.layers[n].sensitivity["int4_sym_g128"] for n in names]).statistic
    common = sa.model_copy(deep=True)
    for name, layer in common.layers.items():
        layer.latency = dict(sb.layers[name].latency)
    same = []
    for bits in (5, 6):
        ours = api._solve(common, bits, "balanced", list(a.groups), None)[0].assignment
        theirs = api._solve(sb, bits, "balanced", list(b.groups), None)[0].assignment
        same.append(f"{bits} bits {'same' if ours == theirs else '**differs**'}")
    return f"{', '.join(same)}; Spearman {rho:.4f}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def machine() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags")
    rows = []
    for line in lscpu:
        key = line.split(":")[0].strip()
        if key.startswith(keep[:3]):
            rows.append(line)
        elif key == "Flags":
            flags = line.split(":", 1)[1].split()
            rows.append("ISA flags: " + " ".join(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f"))))
    mem = next((line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "")
    return [*rows, mem]


def median_run(runs: list[dict]) -> dict:
    """The run of median search time (the upper one of an even count), with its own stages."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20m,100m,400m,1b")
    parser.add_argument("--memory-sizes", default="20m,100m,400m", help="sizes also searched in memory")
    parser.add_argument("--baseline", type=Path, help="another autoq checkout (e.g. a worktree of main)")
    parser.add_argument("--baseline-sizes", default="20m,100m")
    parser.add_argument("--ray-sizes", default="100m", help="sizes also searched streamed with 2 local Ray workers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for 20m and the depth sweep")
    parser.add_argument("--depth", action="store_true", help="also 4 -> 16 layers at the 20m width")
    parser.add_argument("--depth-rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale-cpu.md")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, cache, out = args.child
        print(json.dumps(child(mode, path, cache, out or None)))
        return 0

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    base_commit = (subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline, capture_output=True,
                                  text=True).stdout.strip() if args.baseline else None)
    emit("# Search cost and memory as a Llama grows (CPU)\n")
    emit(f"`bench/scale.py` at {commit}{f', baseline {base_commit} ({args.baseline})' if base_commit else ''}, "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Random-init Llama checkpoints (vocab {VOCAB}), "
         f"{BATCHES} batches of {BATCH} x {TOKENS} token ids, default search (6 bits, balanced, default formats), "
         "cold caches; each run a fresh process. Peak RSS is the process's `ru_maxrss`; 'over idle' subtracts a "
         "process that only ran `import autoq`.\n")
    emit("## Machine\n\n```")
    emit("\n".join(machine()))
    emit(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    emit("```\n")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="autoq-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in [*work.glob("cache-*"), work / "idle-cache"]:  # a cached plan would skip the search
        shutil.rmtree(stale, ignore_errors=True)
    idle = spawn("idle", work, work / "idle-cache")["peak_rss"]
    emit(f"Idle `import autoq` process: {mib(idle)} MiB peak RSS.\n")
    emit("| model | params | weights on disk | path | search s | profile | benchmark | sensitivity | "
         "peak RSS MiB | over idle MiB | vs in memory (one latency table) |")
    emit("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    sizes = args.sizes.split(",")
    measured: dict[str, dict[str, dict]] = {}
    for size in sizes:
        hidden, layers, inter, heads, kv, dtype = SIZES[size]
        path = work / f"llama-{size}"
        if not (path / "config.json").is_file():
            spawn(f"make-{size}", path, work / "unused")
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        modes = ["streamed"]
        if size in args.memory_sizes.split(","):
            modes.append("memory")
        if args.baseline and size in args.baseline_sizes.split(","):
            modes.append("baseline")
        if size in args.ray_sizes.split(","):
            modes.append("streamed-ray")
        rounds = args.rounds if size == "20m" else 1
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(rounds):
            for mode in modes:
                root = args.baseline if mode == "baseline" else REPO
                runs[mode].append(spawn(mode, path, work / f"cache-{size}-{mode}-{r}", root=root))
        measured[size] = {m: median_run(v) for m, v in runs.items()}
        params = model_params(hidden, layers, inter, heads, kv)
        for mode in modes:
            res = measured[size][mode]
            st = res["stage_seconds"]
            same = ("" if mode == "memory" or "memory" not in measured[size]
                    else agreement(res["plan"], measured[size]["memory"]["plan"]))
            label = {"streamed": "streamed", "memory": "in memory", "baseline": "baseline (in memory)",
                     "streamed-ray": "streamed, 2 Ray workers"}[mode]
            emit(f"| llama-{size} ({dtype}) | {params / 1e6:,.0f}M | {mib(disk)} MiB | {label} | {res['seconds']:.1f} | "
                 f"{st.get('profile', 0):.1f} | {st.get('benchmark', 0):.1f} | {st.get('sensitivity', 0):.1f} | "
                 f"{mib(res['peak_rss'])} | {mib(res['peak_rss'] - idle)} | {same} |")
    emit("")
    for size in sizes:
        m = measured[size]
        if "baseline" in m:
            for mode in ("streamed", "memory"):
                if mode in m:
                    emit(f"- llama-{size}: {mode} search {m['baseline']['seconds'] / m[mode]['seconds']:.2f}x "
                         f"the baseline's speed ({m[mode]['seconds']:.1f} s vs {m['baseline']['seconds']:.1f} s, "
                         f"median of {args.rounds} interleaved runs, each with its own caches).")
        if "streamed-ray" in m:
            emit(f"- llama-{size}: streamed search with its sensitivity pass on 2 local Ray workers (one core each) "
                 f"{m['streamed']['seconds'] / m['streamed-ray']['seconds']:.2f}x the one-process streamed speed "
                 f"({m['streamed-ray']['seconds']:.1f} s vs {m['streamed']['seconds']:.1f} s; its peak RSS is the "
                 "driver's, each worker streams the checkpoint too).")
    emit("")

    largest = sizes[-1]
    path, out = work / f"llama-{largest}", work / f"llama-{largest}-autoq"
    exported = spawn("export", path, work / f"cache-{largest}-streamed-0", out=out)
    loaded = spawn("load", path, work / "unused", out=out)
    script = work / "load_without_autoq.py"
    script.write_text(LOAD_WITHOUT_AUTOQ)
    plain = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, cwd=work,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    plain_result = (f"relative error of its logits vs `load_quantized`'s {float(plain.stdout.split()[-1]):.2e}"
                    if plain.returncode == 0 else f"FAILED: {plain.stderr[-500:]}")
    out_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    emit(f"## Export of llama-{largest}\n")
    emit(f"- streamed `autoq.pipeline.quantize(DIR, out_dir=...)` (the plan from the cache, then quantize and write "
         f"block by block): {exported['seconds']:.1f} s, peak RSS {mib(exported['peak_rss'])} MiB "
         f"({mib(exported['peak_rss'] - idle)} MiB over idle), {mib(out_disk)} MiB written "
         f"({exported['bits']:.2f} effective bits).")
    emit(f"- `autoq.load_quantized`: {loaded['layers']} quantized layers, loaded and run in {loaded['seconds']:.1f} s, "
         f"peak RSS {mib(loaded['peak_rss'])} MiB.")
    emit(f"- transformers in a process that never imports autoq: loads it; {plain_result}.\n")

    if args.depth:
        emit("## Depth: the 20m width with 4 and 16 layers, streamed\n")
        emit("| layers | search s | profile | benchmark | sensitivity | peak RSS MiB |")
        emit("|---:|---:|---:|---:|---:|---:|")
        depth: dict[int, dict] = {}
        for n in (4, 16):
            path = work / f"llama-20m-{n}l"
            if not (path / "config.json").is_file():
                spawn("make-20m", path, work / "unused", out=str(n))
        for r in range(args.depth_rounds):
            for n in (4, 16):
                depth.setdefault(n, []).append(spawn("streamed", work / f"llama-20m-{n}l", work / f"cache-d{n}-{r}"))
        depth = {n: median_run(v) for n, v in depth.items()}
        for n, res in depth.items():
            st = res["stage_seconds"]
            emit(f"| {n} | {res['seconds']:.1f} | {st['profile']:.1f} | {st['benchmark']:.1f} | "
                 f"{st['sensitivity']:.1f} | {mib(res['peak_rss'])} |")
        ratio = depth[16]["seconds"] / depth[4]["seconds"]
        bench_ratio = depth[16]["stage_seconds"]["benchmark"] / depth[4]["stage_seconds"]["benchmark"]
        emit(f"\n4 -> 16 layers: search {ratio:.2f}x (bar 4.4x), benchmark stage {bench_ratio:.2f}x (bar 1.2x).\n")

    # Growth, fitted to the streamed runs: time of profile + sensitivity per parameter (from the
    # largest run: the fixed costs, the 32000-token head, matter least there); memory over idle
    # as a fixed part (the head's logits and their probe gradients per batch, the timing copies)
    # plus a multiple of one block's bytes, by least squares over the sizes.
    emit("## What the measured growth implies\n")
    ref = measured[largest]["streamed"]
    hidden, layers, inter, heads, kv, _ = SIZES[largest]
    ref_params = model_params(hidden, layers, inter, heads, kv)
    per_param = (ref["stage_seconds"]["sensitivity"] + ref["stage_seconds"]["profile"]) / ref_params
    xs, ys = [], []
    for size in sizes:
        h, _n, i, nh, nkv, dtype = SIZES[size]
        xs.append(block_params(h, i, nh, nkv) * (2 if dtype == "bfloat16" else 4))
        ys.append(measured[size]["streamed"]["peak_rss"] - idle)
    if len(xs) > 1:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        k = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(sum((x - mx) ** 2 for x in xs), 1), 0.0)
        c = my - k * mx
    else:
        k, c = 0.0, ys[0]
    emit(f"Measured on llama-{largest}: profile + sensitivity {per_param * 1e9:.0f} s per billion parameters "
         f"(a forward, a backward with probes and one quantized forward per candidate for every layer: linear "
         f"in parameters x tokens); benchmark {ref['stage_seconds']['benchmark']:.0f} s for its 7 distinct layer "
         f"shapes. Peak RSS over idle fitted over the sizes: {mib(c)} MiB + {k:.1f} x one block's bytes.\n")
    emit("| model | params | bf16 block | profile + sensitivity (est.) | benchmark (est.) | peak RSS over idle (est.) |")
    emit("|---|---:|---:|---:|---:|---:|")
    for name, (h, n_layers, i, nh, nkv) in EXTRAPOLATE.items():
        params = model_params(h, n_layers, i, nh, nkv)
        block = block_params(h, i, nh, nkv) * 2
        act = (n_layers + 1) * BATCHES * BATCH * TOKENS * h * 2  # hidden states between blocks, bf16
        memory = c + k * block + min(act, 1 << 30)  # beyond max_memory (1 GiB) they spill to disk
        bench_est = ref["stage_seconds"]["benchmark"] * (h * i) / (hidden * inter)
        emit(f"| Llama-{name} | {params / 1e9:.1f}B | {mib(block)} MiB | {per_param * params / 3600:.1f} h | "
             f"{bench_est / 60:.0f} min | {memory / 2**30:.1f} GiB |")
    emit("\nThe benchmark estimate scales the timed shapes by their size (7 shapes whatever the depth). On this "
         "2-core CPU the sensitivity pass dominates; on a GPU it is the same FLOPs at a far higher rate.")
    (args.out.with_suffix(".json")).write_text(json.dumps({"idle": idle, "measured": measured}, indent=1))
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
