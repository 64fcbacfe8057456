"""GPTQ vs round-to-nearest on the bundled MiniLM, every nn.Linear at one format (fake quant).

Each layer's weight is replaced by its dequantized float weight (autoq's quantized modules are not
used), then the held-out embedding cosine against the float model is measured on
``tests/conftest.py`` ``UNSEEN_SENTENCES`` and on this script's ``OTHER_SENTENCES``
(mean-pooled ``last_hidden_state`` with the attention mask, then cosine).

Hessian schedules for GPTQ:
- ``sequential``: layers in forward order, one stage per distinct layer input (q/k/v together,
  then the attention output, the intermediate, the output dense, ...); each stage's Hessians are
  collected on the model whose earlier stages are already quantized (the standard schedule);
- ``block``: one stage per transformer block (its layers' Hessians collected together);
- ``parallel``: all Hessians collected once on the float model;
- ``batched``: ``parallel``, with the layers of one shape quantized together (``gptq_quantize_many``).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gptq_minilm.py --threads 1 \
        --formats int4_g128 int4_g32 int8 --schedule sequential block parallel batched --damp 0.01 0.1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gptq_minilm.py --threads 1 --search-cost --damp 0.1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gptq_minilm.py --threads 1 --schedule batched --damp 0.1 --no-clip-search

Results: bench/results/gptq-minilm.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autoq import gptq  # noqa: E402
from autoq import primitives as P  # noqa: E402
from autoq.calibration import bundled_texts, text_batches  # noqa: E402
from autoq.models import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import UNSEEN_SENTENCES, embedding_cosine, mean_pooled  # noqa: E402

# A second held-out set, in neither the calibration texts nor the tests, so the numbers are not
# tuned to one set of 16 sentences. Longer and more varied than UNSEEN_SENTENCES.
OTHER_SENTENCES = [
    "Before sunrise the fishermen unload their catch onto the quay.",
    "Our neighbour's cat has learned to open the garden gate by itself.",
    "If the contract is not signed by Thursday, the supplier will raise its prices.",
    "Glaciers in the region have retreated several kilometres over the past century.",
    "The new tram line cut the commute from the suburbs to half an hour.",
    "The choir sang carols outside the hospital on Christmas Eve.",
    "A committee of volunteers restored the old windmill on the hill.",
    "The goalkeeper saved two penalties and the team won the final.",
    "Farmers are switching to crops that need less water during dry summers.",
    "The printer jammed again, so the report was handed in an hour late.",
    "Scientists tagged forty turtles to follow their migration across the ocean.",
    "He translated the manual from German into Spanish in a single weekend.",
    "A family of foxes has moved into the railway embankment.",
    "Ticket prices for the festival doubled once the headline band was announced.",
    "The surgeon explained the risks of the operation in plain language.",
    "Snow blocked the mountain pass, and the buses had to turn back.",
]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# GPTQ's int4 fit: the MSE clip search of primitives.quantize_int4_asymmetric unless --no-clip-search.
CLIP_SEARCH = True


def int4_fit(w_group: torch.Tensor) -> gptq.Int4GroupParams:
    return gptq.fit_int4(w_group, clip_search=CLIP_SEARCH)


def int4_group_size(fmt: str) -> int | None:
    """``int4_g128`` -> 128; ``int8`` (symmetric per output channel) -> None."""
    if fmt == "int8":
        return None
    if not fmt.startswith("int4_g"):
        raise ValueError(f"unknown format {fmt!r}; use int4_g<G> or int8")
    return int(fmt.removeprefix("int4_g"))


def rtn_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    group_size = int4_group_size(fmt)
    if group_size is None:
        q, scale = P.quantize_int8_symmetric(w.float(), (1, w.shape[1]))
        return P.dequantize_affine(q, (1, w.shape[1]), scale, None)
    q, scale, zero_point = P.quantize_int4_asymmetric(w.float(), group_size)
    return P.dequantize_affine(q, (1, group_size), scale, zero_point)


def gptq_weight(w: torch.Tensor, h: torch.Tensor, fmt: str, damp: float, block_size: int) -> tuple[torch.Tensor, str]:
    group_size = int4_group_size(fmt)
    if group_size is None:
        group_size, fit, fake_quant = w.shape[1], gptq.fit_int8, gptq.fake_quant_int8
    else:
        fit, fake_quant = int4_fit, gptq.fake_quant_int4
    try:
        result = gptq.gptq_quantize(w.float(), h, group_size, fit, fake_quant, block_size=block_size, damp=damp)
    except gptq.DegenerateHessian as e:
        return rtn_weight(w, fmt), e.reason
    return result.weight, ""


def forward_stages(model: nn.Module, batch: dict, layers: dict[str, nn.Linear]) -> list[list[str]]:
    """Layers in the order the forward pass calls them, grouped by identical input tensor."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, args[0])))
        for name, m in layers.items()
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    previous: torch.Tensor | None = None
    for name, x in calls:
        if previous is not None and x is previous:
            stages[-1].append(name)
        else:
            stages.append([name])
        previous = x
    return stages


def block_stages(stages: list[list[str]]) -> list[list[str]]:
    """Merge sub-layer stages into one stage per transformer block (``encoder.layer.<i>``)."""
    merged: dict[str, list[str]] = {}
    for stage in stages:
        parts = stage[0].split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["encoder", "layer"] else stage[0]
        merged.setdefault(key, []).extend(stage)
    return list(merged.values())


def quantize_rtn(model: nn.Module, fmt: str) -> None:
    with torch.no_grad():
        for layer in linear_layers(model).values():
            layer.weight.copy_(rtn_weight(layer.weight, fmt))


def quantize_gptq(
    model: nn.Module, calibration: list[dict], fmt: str, schedule: str, damp: float, block_size: int
) -> tuple[float, list[str]]:
    """Quantize every Linear with GPTQ; returns (seconds spent collecting Hessians, fallback notes)."""
    layers = linear_layers(model)
    stages = forward_stages(model, calibration[0], layers)
    if schedule == "parallel":
        stages = [[name for stage in stages for name in stage]]
    elif schedule == "block":
        stages = block_stages(stages)
    notes = []
    hessian_seconds = 0.0
    for stage in stages:
        start = time.perf_counter()
        accs = gptq.accumulate_hessians(model, calibration, {name: layers[name] for name in stage})
        hessian_seconds += time.perf_counter() - start
        with torch.no_grad():
            for name in stage:
                w, note = gptq_weight(layers[name].weight, accs[name].hessian, fmt, damp, block_size)
                layers[name].weight.copy_(w)
                if note:
                    notes.append(f"{name}: {note}")
    return hessian_seconds, notes


def quantize_gptq_batched(
    model: nn.Module, calibration: list[dict], fmt: str, damp: float, block_size: int
) -> tuple[float, list[str]]:
    """The ``parallel`` schedule computed faster: every Hessian from one pass on the float model,
    factored once per distinct input (q/k/v share), and the layers of one weight shape quantized
    together by ``gptq_quantize_many``. Same results as ``parallel`` up to float rounding."""
    layers = linear_layers(model)
    start = time.perf_counter()
    accs = gptq.accumulate_hessians(model, calibration, layers)
    hessian_seconds = time.perf_counter() - start
    notes = []
    prepared: dict[int, gptq.PreparedHessian] = {}
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        acc = accs[name]
        if id(acc) not in prepared:
            try:
                prepared[id(acc)] = gptq.prepare_hessian(acc.hessian, damp)
            except gptq.DegenerateHessian as e:
                notes.append(f"{name}: {e.reason}")
                with torch.no_grad():
                    layer.weight.copy_(rtn_weight(layer.weight, fmt))
                continue
        by_shape.setdefault(tuple(layer.weight.shape), []).append(name)
    group_size = int4_group_size(fmt)
    for (_, k), names in by_shape.items():
        if group_size is None:
            quantizer = (k, gptq.fit_int8, gptq.fake_quant_int8)
        else:
            quantizer = (group_size, int4_fit, gptq.fake_quant_int4)
        results = gptq.gptq_quantize_many(
            [layers[n].weight for n in names], [prepared[id(accs[n])] for n in names], *quantizer,
            block_size=block_size,
        )
        with torch.no_grad():
            for name, result in zip(names, results, strict=True):
                layers[name].weight.copy_(result.weight)
    return hessian_seconds, notes


def search_cost(model: nn.Module, calibration: list[dict], damp: float, block_size: int) -> None:
    """Seconds for what a search needs: every layer in every weight format autoq has (int8 is
    shared by int8_dynamic and int8_weight_only), RTN vs GPTQ with one Hessian pass on the float
    model, one factorisation per distinct input and one batched loop per weight shape."""
    layers = linear_layers(model)
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    formats = ["int4_g128", "int4_g64", "int4_g32", "int8"]
    start = time.perf_counter()
    accs = gptq.accumulate_hessians(model, calibration, layers)
    pass_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prepared_by_id = {id(acc): gptq.prepare_hessian(acc.hessian, damp) for acc in accs.values()}
    prepared = {name: prepared_by_id[id(accs[name])] for name in layers}
    prepare_seconds = time.perf_counter() - start
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    print(f"| step ({len(prepared_by_id)} distinct inputs for {len(layers)} layers) | GPTQ seconds | RTN seconds |")
    print("|---|---:|---:|")
    print(f"| Hessian pass (once) | {pass_seconds:.2f} | - |")
    print(f"| prepare_hessian: dampening + Cholesky (once) | {prepare_seconds:.2f} | - |")
    total_gptq, total_rtn = pass_seconds + prepare_seconds, 0.0
    for fmt in formats:
        group_size = int4_group_size(fmt)
        start = time.perf_counter()
        for (_, k), names in by_shape.items():
            if group_size is None:
                quantizer = (k, gptq.fit_int8, gptq.fake_quant_int8)
            else:
                quantizer = (group_size, int4_fit, gptq.fake_quant_int4)
            gptq.gptq_quantize_many(
                [weights[n] for n in names], [prepared[n] for n in names], *quantizer, block_size=block_size
            )
        gptq_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for w in weights.values():
            rtn_weight(w, fmt)
        rtn_seconds = time.perf_counter() - start
        total_gptq, total_rtn = total_gptq + gptq_seconds, total_rtn + rtn_seconds
        print(f"| {fmt} | {gptq_seconds:.2f} | {rtn_seconds:.2f} |")
    print(f"| **total** | **{total_gptq:.2f}** | **{total_rtn:.2f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=["int4_g128", "int4_g32"], help="int4_g<G> and/or int8")
    parser.add_argument("--schedule", nargs="+", default=["sequential", "parallel"], choices=["sequential", "block", "parallel", "batched"])
    parser.add_argument("--damp", type=float, nargs="+", default=[0.01])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--calibration-batch-size", type=int, default=8,
                        help="sentences per calibration batch (1: no padding rows in the Hessians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--search-cost", action="store_true",
                        help="only time every layer in every weight format, RTN vs GPTQ (see search_cost)")
    parser.add_argument("--no-clip-search", action="store_true",
                        help="GPTQ's int4 fit uses plain min/max ranges (RTN keeps its clip search)")
    args = parser.parse_args()
    global CLIP_SEARCH
    CLIP_SEARCH = not args.no_clip_search
    if args.threads:
        torch.set_num_threads(args.threads)

    float_model, tokenizer = load_model("bundled:minilm")
    calibration = text_batches(bundled_texts(), tokenizer, batch_size=args.calibration_batch_size)
    rows = sum(int(b["attention_mask"].numel()) for b in calibration)
    real = sum(int(b["attention_mask"].sum()) for b in calibration)
    held_out = {
        "unseen": dict(tokenizer(UNSEEN_SENTENCES, padding=True, return_tensors="pt")),
        "other": dict(tokenizer(OTHER_SENTENCES, padding=True, return_tensors="pt")),
    }
    references = {key: mean_pooled(float_model, batch) for key, batch in held_out.items()}

    def cosines(model: nn.Module) -> str:
        return " | ".join(
            f"{embedding_cosine(mean_pooled(model, batch), references[key]):.4f}" for key, batch in held_out.items()
        )

    if args.search_cost:
        search_cost(float_model, calibration, args.damp[0], args.block_size)
        return
    print(f"MiniLM: {len(linear_layers(float_model))} Linear layers; calibration {len(calibration)} batches, "
          f"{rows} activation rows ({real} non-padding); held-out: tests/conftest.py UNSEEN_SENTENCES ({len(UNSEEN_SENTENCES)}) "
          f"and this script's OTHER_SENTENCES ({len(OTHER_SENTENCES)}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| format | method | schedule | damp | cosine (unseen) | cosine (other) | seconds | of which Hessian passes |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for fmt in args.formats:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        quantize_rtn(model, fmt)
        seconds = time.perf_counter() - start
        print(f"| {fmt} | rtn | - | - | {cosines(model)} | {seconds:.2f} | - |", flush=True)
        for schedule in args.schedule:
            for damp in args.damp:
                model = copy.deepcopy(float_model)
                start = time.perf_counter()
                if schedule == "batched":
                    hessian_seconds, notes = quantize_gptq_batched(model, calibration, fmt, damp, args.block_size)
                else:
                    hessian_seconds, notes = quantize_gptq(model, calibration, fmt, schedule, damp, args.block_size)
                seconds = time.perf_counter() - start
                print(f"| {fmt} | gptq | {schedule} | {damp:g} | {cosines(model)} | {seconds:.2f} | {hessian_seconds:.2f} |",
                      flush=True)
                for note in notes:
                    print(f"  fell back to RTN: {note}")


if __name__ == "__main__":
    main()
