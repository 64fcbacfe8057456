"""The search entry points: ``search``, ``resolve`` and ``apply`` (``autoquant``, search + apply,
is the pipeline's: ``autoq.pipeline``).

``search`` runs the stages in order — profile, benchmark, sensitivity, solve (and optionally
refine) — each taking plain data and returning plain data, with the results cached on disk (see
``autoq.cache``). This module only sequences them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

from torch import nn

from autoq import bench, formats, profile, sensitivity, solve, stream
from autoq.cache import PlanCache, make_key, model_fingerprint
from autoq.calibration import as_batches, fingerprint
from autoq.config import SearchConfig, loss_identity, plan_key
from autoq.plan import LayerStats, ModelInfo, Plan, SearchStats, ShapeCount, build_plan
from autoq.stages import Stage
from autoq.swap import LayerQuantizer, assignment_of, float_weight, layer_shape, quantizable_layers
from autoq.swap import apply as swap_layers

__all__ = ["SearchConfig", "apply", "resolve", "search"]

ProgressFn = Callable[[str, float, str], None]
REFINE_BUDGET_STEPS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # seed budgets around the requested one


# ------------------------------------------------------------------------------- progress


class _RichProgress:
    """One rich progress bar per stage, on stderr."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.fields[stage]:<12}"), BarColumn(),
                             TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                             TextColumn("{task.description}"), console=Console(stderr=True))
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if not self.tasks:
            self.bars.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(message, total=1.0, stage=stage)
        self.bars.update(self.tasks[stage], completed=min(max(fraction, 0.0), 1.0),
                         description=message[:60])

    def close(self) -> None:
        if self.tasks:
            self.bars.stop()


def _reporter(progress: bool | ProgressFn) -> ProgressFn | None:
    if progress is True:
        return _RichProgress()
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    raise TypeError("progress must be True, False or a callable progress(stage, fraction, message)")


def _stage(report: ProgressFn | None, stage: str) -> Callable[[float, str], None] | None:
    return None if report is None else (lambda fraction, message: report(stage, fraction, message))


# ------------------------------------------------------------------------------- arguments


def _loss_description(config: SearchConfig, batches: Sequence) -> str:
    if config.loss_fn is not None:
        return f"loss_fn {getattr(config.loss_fn, '__qualname__', type(config.loss_fn).__name__)} " \
               f"({loss_identity(config.loss_fn)})"
    if all(isinstance(b, dict) and "labels" in b for b in batches):
        return "the model's own loss (batches carry labels)"
    return f"random output probes ({config.probes})"


# ------------------------------------------------------------------------------- the stages


def _measure(model: nn.Module, batches: Sequence, layers: dict[str, nn.Module], config: SearchConfig, *,
             cache: PlanCache, hardware: dict, model_info: ModelInfo, calibration: str,
             report: ProgressFn | None, streamed: stream.StreamedModel | None = None) -> SearchStats:
    """Profile, benchmark and score: everything a plan is solved from."""
    fmts = list(config.formats)
    hw_key = bench.hardware_key(hardware)
    notes: list[str] = []
    settings = {"probes": config.probes, "seed": config.seed, "sqnr_floor_db": bench.SQNR_FLOOR_DB,
                "m_bucketing": "next power of two", "loss": _loss_description(config, batches),
                "method": config.method, "calibration_batches": len(batches)}
    if streamed is not None:
        result = stream.measure(streamed, batches, layers, fmts, timings=cache.timings(hw_key),
                                loss_fn=config.loss_fn, probes=config.probes, seed=config.seed,
                                max_memory=config.max_memory, spill_dir=config.spill_dir, report=report,
                                workers=config.workers, ray_address=config.ray_address)
        prof, timed, scores, failed, methods, seconds = (result.profile, result.bench, result.scores,
                                                         result.dropped, {}, result.seconds)
        notes.append(result.note)
        settings.update(mode="streamed", peak_rss_bytes=result.peak_rss, spilled_bytes=result.spilled_bytes,
                        workers=config.workers)
    else:
        prof, timed, scores, failed, methods, seconds, gptq_notes = _measure_in_memory(
            model, batches, layers, config, cache=cache, hw_key=hw_key, report=report)
        notes += gptq_notes
        settings.update(mode="in memory")
    cache.add_timings(hw_key, timed.new_timings)

    stats = {}
    for name in layers:
        lp = prof.layers[name]
        out_features, in_features = lp.out_features, lp.in_features
        stats[name] = LayerStats(
            out_features=out_features, in_features=in_features, numel=out_features * in_features,
            dtype=lp.dtype or "unknown",
            shapes=[ShapeCount(m=m, k=k, count=c) for (m, k), c in sorted(lp.shapes.items())],
            bits={f: formats.get(f).storage_bits(out_features, in_features) for f in scores[name]},
            latency={f: t for f, t in timed.latency[name].items() if f in scores[name]},
            sensitivity=scores[name], dropped={**timed.dropped[name], **failed[name]},
            methods={f: m for f, m in methods.get(name, {}).items() if f in scores[name] and m != "rtn"})
    return SearchStats(
        autoq_version=hardware["autoq"], model=model_info, calibration=calibration,
        num_batches=len(batches), hardware=hardware, formats=fmts, settings=settings,
        stage_seconds=seconds, layers=stats, notes=notes)


def _measure_in_memory(model: nn.Module, batches: Sequence, layers: dict[str, nn.Module], config: SearchConfig, *,
                       cache: PlanCache, hw_key: str, report: ProgressFn | None):
    fmts = list(config.formats)
    seconds = {}
    start = time.perf_counter()
    prof = profile.profile(model, batches, layers, report=_stage(report, Stage.PROFILE))
    # Each (layer, format) is quantized once per method and shared by the stages.
    rtn = LayerQuantizer("rtn")
    gptq = None
    if config.method != "rtn":
        gptq = LayerQuantizer("gptq", profile.collect_hessians(model, batches, layers))
        gptq.precompute(layers, fmts, report=_stage(report, Stage.PROFILE))
    seconds[Stage.PROFILE] = time.perf_counter() - start

    start = time.perf_counter()
    timed = bench.benchmark(layers, prof, fmts, timings=cache.timings(hw_key),
                            report=_stage(report, Stage.BENCHMARK),
                            quantized=gptq if config.method == "gptq" else rtn)
    seconds[Stage.BENCHMARK] = time.perf_counter() - start

    start = time.perf_counter()
    candidates = {name: [f for f in fmts if f in timed.latency[name]] for name in layers}
    quantizers = {"rtn": [rtn], "gptq": [gptq], "auto": [rtn, gptq]}[config.method]
    checkpointing = prof.batch_activation_bytes() > sensitivity.CHECKPOINT_ABOVE_BYTES
    scored = [sensitivity.score(model, batches, layers, candidates, loss_fn=config.loss_fn,
                                probes=config.probes, seed=config.seed, quantized=quantizer,
                                checkpointing=checkpointing,
                                report=_stage(report, Stage.SENSITIVITY) if i == len(quantizers) - 1 else None)
              for i, quantizer in enumerate(quantizers)]
    scores, failed, methods = _lowest_scores(quantizers, scored)
    seconds[Stage.SENSITIVITY] = time.perf_counter() - start
    notes = list(gptq.notes.values()) if gptq is not None else []
    return prof, timed, scores, failed, methods, seconds, notes


def _lowest_scores(quantizers: list[LayerQuantizer], scored: list[tuple[dict, dict]]):
    """Per (layer, format), the lowest score any method reached, and that method; a format is
    dropped only when every method failed on it."""
    scores: dict[str, dict[str, float]] = {}
    failed: dict[str, dict[str, str]] = {}
    methods: dict[str, dict[str, str]] = {}
    for name in scored[0][0]:
        scores[name], methods[name] = {}, {}
        for quantizer, (layer_scores, _) in zip(quantizers, scored, strict=True):
            for fmt, score in layer_scores[name].items():
                if fmt not in scores[name] or score < scores[name][fmt]:
                    scores[name][fmt] = score
                    methods[name][fmt] = quantizer.methods.get((name, fmt), "rtn")
        failed[name] = {fmt: reason for _, layer_failed in scored for fmt, reason in layer_failed[name].items()
                        if fmt not in scores[name]}
    return scores, failed, methods


def _solve(stats: SearchStats, budget: float, objective: str, rules: list[str],
           report: ProgressFn | None) -> tuple[solve.Solution, dict[str, str]]:
    groups = solve.group_layers(stats.layers, rules)
    stage = _stage(report, Stage.SOLVE)
    if stage is not None:
        stage(0.0, f"{len(set(groups.values()))} groups, objective={objective}, budget={budget:g}")
    solution = solve.solve(stats.costs(), budget, objective, groups)
    if stage is not None:
        stage(1.0, f"effective bits {solution.effective_bits:.3f}, predicted latency "
                   f"{solution.latency * 1e3:.3g} ms vs {solution.latency_unquantized * 1e3:.3g} ms unquantized")
    return solution, groups


def search(model: nn.Module | str | os.PathLike | stream.StreamedModel, calibration,
           config: SearchConfig | None = None, *, progress: bool | ProgressFn = True, **settings) -> Plan:
    """Find the best format per layer for this model on this hardware; the model is not changed.

    ``model``: a model object (searched in memory), or a local Hugging Face model directory
    (safetensors), which is streamed: built on the meta device and read one block at a time, so
    a model larger than memory can be searched (see ``autoq.stream``; ``method="rtn"``, no
    refinement).

    ``config`` is a :class:`autoq.SearchConfig`; its fields can also be given (or overridden) as
    keyword arguments, e.g. ``search(model, batches, effective_bits=5, objective="accuracy")``.
    ``progress``: True for progress bars on stderr, False for silence, or a callable
    ``progress(stage, fraction, message)`` whose exceptions propagate (use that to cancel).

    The result is cached under ``config.cache_dir``: a repeated call returns the cached plan
    (``plan.from_cache``); a new budget or objective re-solves from cached statistics.
    """
    config = SearchConfig.build(config, **settings)
    report = _reporter(progress)
    try:
        return _search(model, calibration, config, report)
    finally:
        if isinstance(report, _RichProgress):
            report.close()


def open_streamed(model: str | os.PathLike | stream.StreamedModel, config: SearchConfig) -> stream.StreamedModel:
    """The streamed model for a directory, refusing what a streamed search cannot do."""
    if config.method != "rtn":
        raise ValueError(f"method={config.method!r} needs the whole model in memory (GPTQ's Hessians and "
                         "weights); a streamed search quantizes with method='rtn'. Load the model and pass "
                         "the model object for GPTQ")
    if config.refine_trials:
        raise ValueError("refine_trials evaluates whole-model losses and needs the model in memory; pass the "
                         "model object, or refine_trials=0 for a streamed search")
    return model if isinstance(model, stream.StreamedModel) else stream.StreamedModel(model)


def _search(model, calibration, config: SearchConfig, report: ProgressFn | None) -> Plan:
    batches = as_batches(calibration)
    streamed = None
    if isinstance(model, str | os.PathLike | stream.StreamedModel):
        streamed = open_streamed(model, config)
        model = streamed.model
    elif config.workers > 1:
        raise ValueError(f"workers={config.workers} splits a streamed search over Ray workers, each reading the "
                         "model from its directory: pass the directory (autoq.search('path/to/model', ...)), "
                         "or save this model with save_pretrained first; or workers=1")
    layers = quantizable_layers(model, exclude=config.exclude)
    if not layers:
        raise ValueError("the model has no quantizable layers (nn.Linear or GPT-2 Conv1D) left to search"
                         + (f" after exclude={list(config.exclude)}" if config.exclude else ""))
    if streamed is None:
        offloaded = [name for name, m in layers.items() if float_weight(m).device.type == "meta"]
        if offloaded:
            raise ValueError(f"{len(offloaded)} layers ({', '.join(offloaded[:3])}{', ...' if len(offloaded) > 3 else ''}) "
                             "have their weights on the meta device (offloaded by accelerate's device_map, or never "
                             "loaded); the in-memory search needs them: pass the model's directory instead, which "
                             "streams it block by block")
    holdout: list = []
    if config.refine_trials:
        if len(batches) < 2:
            raise ValueError("refine_trials needs at least 2 calibration batches (one is held out)")
        n_hold = max(1, len(batches) // 4)
        batches, holdout = batches[:-n_hold], batches[-n_hold:]

    device = streamed.device if streamed is not None else profile.model_device(model)
    hardware = bench.hardware_info(device)
    shapes = {name: layer_shape(m) for name, m in layers.items()}
    fingerprint_ = streamed.fingerprint(shapes) if streamed is not None else model_fingerprint(model, shapes)
    model_info = ModelInfo(architecture=type(model).__name__, fingerprint=fingerprint_)
    calibration_fp = fingerprint(batches + holdout)
    cache = PlanCache(config.cache_dir)
    stats_key = make_key("stats", model_info.fingerprint, calibration_fp, len(holdout), *config.stats_identity(),
                         bench.SQNR_FLOOR_DB, hardware)
    budget, objective, rules = config.effective_bits, config.objective, list(config.groups)
    key = plan_key(stats_key, budget, objective, rules, config.refine_trials)

    cached = cache.get(key)
    if cached is not None:
        cached.from_cache = True
        if report is not None:
            report(Stage.SOLVE, 1.0, f"cached plan {key}")
        return cached

    stats = cache.get_stats(stats_key)
    if stats is None:
        stats = _measure(model, batches, layers, config, cache=cache, hardware=hardware, model_info=model_info,
                         calibration=calibration_fp, report=report, streamed=streamed)
        cache.put_stats(stats_key, stats)

    start = time.perf_counter()
    solution, group_map = _solve(stats, budget, objective, rules, report)
    seconds = {**stats.stage_seconds, Stage.SOLVE: time.perf_counter() - start}
    pareto = None
    notes = [f"layer {n} never ran on the calibration data: timed and scored as free"
             for n, layer in stats.layers.items() if not layer.shapes]
    if config.refine_trials:
        start = time.perf_counter()
        solution, pareto, refine_notes = _refine(model, batches, holdout, layers, config, stats, solution,
                                                 group_map, cache, key, report)
        notes += refine_notes
        seconds[Stage.REFINE] = time.perf_counter() - start
    plan = build_plan(stats, solution, budget=budget, objective=objective, group_rules=rules,
                      groups=group_map, pareto=pareto, notes=notes, stage_seconds=seconds,
                      cache_key=key, stats_key=stats_key)
    cache.put(plan)
    return plan


def _refine(model, batches, holdout, layers, config: SearchConfig, stats, solution, group_map, cache, key,
            report):
    costs = stats.costs()
    budget, objective = config.effective_bits, config.objective
    evaluate = sensitivity.LossEvaluator(model, holdout, layers, config.loss_fn,
                                         quantized=_stats_quantizer(model, batches, layers, stats))
    budgets = [b for b in (budget + step for step in REFINE_BUDGET_STEPS) if b > 0]
    front = solve.refine(costs, group_map, evaluate, budgets=budgets, objective=objective,
                         trials=config.refine_trials, storage=cache.study_storage(),
                         study_name=f"autoq-{key}", seed=config.seed, report=_stage(report, Stage.REFINE))
    # Keep a point that honours the budget and the latency the objective asks for, with the
    # lowest measured loss; the integer-program solution itself was one of the trials.
    #   accuracy: any latency; balanced: the limit the integer program honoured (no slower than
    #   unquantized, or its own latency when that was impossible); speed: as fast as the
    #   integer program's plan, the fastest within the score limit.
    if objective == "accuracy":
        latency_limit = math.inf
    elif objective == "speed":
        latency_limit = solution.latency
    else:
        latency_limit = max(solution.latency, solution.latency_unquantized)
    eligible = [p for p in front if p.effective_bits <= budget + 1e-9 and p.latency <= latency_limit * (1 + 1e-9)]
    notes = []
    if eligible:
        best = min(eligible, key=lambda p: p.loss)
        ip_loss = evaluate(solution.assignment)
        if best.loss < ip_loss:
            notes.append(f"refinement measured loss {best.loss:.4g} vs {ip_loss:.4g} for the integer program")
            solution = solve.Solution(best.assignment, best.effective_bits,
                                      solve.total_score(costs, best.assignment), best.latency,
                                      solution.latency_unquantized, solution.notes)
    return solution, front, notes


def _stats_quantizer(model: nn.Module, batches: Sequence, layers: dict[str, nn.Module],
                     stats: SearchStats, only_chosen: dict[str, str] | None = None) -> LayerQuantizer:
    """A quantizer that gives each (layer, format) the method the statistics scored it with
    (restricted to ``only_chosen``'s pairs when given)."""
    keys = {(name, fmt) for name, layer in stats.layers.items() for fmt, method in layer.methods.items()
            if method == "gptq" and (only_chosen is None or only_chosen.get(name) == fmt)}
    if not keys:
        return LayerQuantizer("rtn")
    needed = {name for name, _ in keys}
    hessians = profile.collect_hessians(model, batches, {n: m for n, m in layers.items() if n in needed})
    return LayerQuantizer("gptq", hessians, only=keys)


def apply(model: nn.Module, assignment, exclude: Sequence[str] = (), include_tied: bool = False, *,
          method: str | None = None, calibration=None) -> nn.Module:
    """Quantize the named layers of ``model`` in place (see ``autoq.swap.apply``) and return it.

    ``assignment`` is a Plan or ``{layer name: format}``. A plan searched with GPTQ records which
    layers took it; those need the calibration they were searched with (``calibration=``, the
    same batches) to be quantized to exactly the scored weights, and raise a clear error
    without it. For a mapping, ``method="gptq"`` quantizes every named layer with GPTQ on
    ``calibration``."""
    if method not in (None, "rtn", "gptq"):
        raise ValueError(f"unknown method {method!r}; choose 'rtn' or 'gptq'")
    chosen = dict(assignment_of(assignment))
    if isinstance(assignment, Plan):
        gptq_layers = {n for n, m in assignment.methods().items() if m == "gptq"}
        usable = assignment.settings.get("calibration_batches")
        described = f"this plan quantized {len(gptq_layers)} layers with GPTQ (e.g. {min(gptq_layers, default='')})"
    else:
        gptq_layers = set(chosen) if method == "gptq" else set()
        usable = None
        described = "method='gptq'"
    gptq_layers = {n for n in gptq_layers if formats.get(chosen[n]).quantized}
    if not gptq_layers:
        return swap_layers(model, chosen, exclude, include_tied)
    if calibration is None:
        raise ValueError(f"{described}: pass calibration=... (the batches it was searched with) so the "
                         "same weights are computed again")
    batches = as_batches(calibration)
    batches = batches[:int(usable)] if usable else batches
    layers = quantizable_layers(model, include_tied=True)
    missing = sorted(gptq_layers - set(layers))
    if missing:
        raise ValueError(f"{missing[0]!r} is not a quantizable layer of this model")
    hessians = profile.collect_hessians(model, batches, {n: layers[n] for n in gptq_layers})
    quantizer = LayerQuantizer("gptq", hessians, only={(n, chosen[n]) for n in gptq_layers})
    quantizer.precompute({n: layers[n] for n in gptq_layers}, set(chosen[n] for n in gptq_layers))
    return swap_layers(model, chosen, exclude, include_tied, quantizer=quantizer)


def resolve(plan: Plan, effective_bits: float | None = None, objective: str | None = None,
            groups: Sequence[str] | None = None) -> Plan:
    """Re-solve ``plan`` for another budget or objective from the statistics it carries, without
    the model. Omitted arguments keep the plan's own."""
    config = SearchConfig(effective_bits=plan.budget if effective_bits is None else effective_bits,
                          objective=plan.objective if objective is None else objective,
                          groups=plan.groups if groups is None else groups, formats=plan.formats)
    budget, objective, rules = config.effective_bits, config.objective, list(config.groups)
    stats = plan.stats()
    start = time.perf_counter()
    solution, group_map = _solve(stats, budget, objective, rules, None)
    stats_key = plan.settings.get("stats_key")
    return build_plan(stats, solution, budget=budget, objective=objective, group_rules=rules, groups=group_map,
                      notes=[f"re-solved from plan {plan.cache_key or '(unsaved)'}"],
                      stage_seconds={**stats.stage_seconds, Stage.SOLVE: time.perf_counter() - start},
                      cache_key=plan_key(stats_key, budget, objective, rules, 0) if stats_key else "",
                      stats_key=stats_key)
