"""The public entry points: ``search``, ``autoquant``, ``resolve`` and ``apply``.

``search`` runs the stages in order — profile, benchmark, sensitivity, solve (and optionally
refine) — each taking plain data and returning plain data, with the results cached on disk (see
``autoq.cache``). This module only sequences them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from autoq import bench, formats, profile, sensitivity, solve
from autoq.cache import PlanCache, make_key, model_fingerprint
from autoq.calibration import as_batches, fingerprint
from autoq.plan import LayerStats, ModelInfo, Plan, SearchStats, ShapeCount, build_plan
from autoq.swap import QuantizedMemo, apply, layer_shape, quantizable_layers

__all__ = ["apply", "autoquant", "resolve", "search"]

ProgressFn = Callable[[str, float, str], None]
STAGES = ("profile", "benchmark", "sensitivity", "solve", "refine")
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


def _formats(requested: Iterable[str] | None) -> list[str]:
    names = formats.names() if requested is None else list(requested)
    if isinstance(requested, str):
        raise TypeError("formats must be a list of format names, not one string")
    if not names:
        raise ValueError(f"formats is empty; choose among {', '.join(formats.names())}")
    for name in names:
        formats.get(name)  # a clear error for unknown names
    return list(dict.fromkeys(["none", *names]))  # a layer can always stay unquantized


def _budget(effective_bits: float | None) -> float:
    budget = solve.DEFAULT_BUDGET if effective_bits is None else effective_bits
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"effective_bits must be a positive number, got {effective_bits!r}")
    return float(budget)


def _objective(objective: str) -> str:
    if objective not in solve.OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(solve.OBJECTIVES)}")
    return objective


def _loss_identity(loss_fn) -> str | None:
    if loss_fn is None:
        return None
    code = getattr(loss_fn, "__code__", None)
    body = code.co_code.hex() + repr(code.co_consts) if code is not None else ""
    return f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}:" + \
        make_key(body)


def _loss_description(loss_fn, batches: Sequence, probes: int) -> str:
    if loss_fn is not None:
        return f"loss_fn {_loss_identity(loss_fn)}"
    if all(isinstance(b, dict) and "labels" in b for b in batches):
        return "the model's own loss (batches carry labels)"
    return f"random output probes ({probes})"


# ------------------------------------------------------------------------------- the stages


def _measure(model: nn.Module, batches: Sequence, layers: dict[str, nn.Module], fmts: list[str], *,
             loss_fn, probes: int, seed: int, cache: PlanCache, hardware: dict, model_info: ModelInfo,
             calibration: str, report: ProgressFn | None) -> SearchStats:
    """Profile, benchmark and score: everything a plan is solved from."""
    seconds = {}
    start = time.perf_counter()
    prof = profile.profile(model, batches, layers, report=_stage(report, "profile"))
    seconds["profile"] = time.perf_counter() - start

    start = time.perf_counter()
    hw_key = bench.hardware_key(hardware)
    quantized: QuantizedMemo = {}  # each (layer, format) quantized once, shared by the stages
    timed = bench.benchmark(layers, prof, fmts, timings=cache.timings(hw_key),
                            report=_stage(report, "benchmark"), quantized=quantized)
    cache.add_timings(hw_key, timed.new_timings)
    seconds["benchmark"] = time.perf_counter() - start

    start = time.perf_counter()
    candidates = {name: [f for f in fmts if f in timed.latency[name]] for name in layers}
    scores, failed = sensitivity.score(model, batches, layers, candidates, loss_fn=loss_fn, probes=probes,
                                       seed=seed, report=_stage(report, "sensitivity"), quantized=quantized)
    seconds["sensitivity"] = time.perf_counter() - start

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
            sensitivity=scores[name], dropped={**timed.dropped[name], **failed[name]})
    return SearchStats(
        autoq_version=hardware["autoq"], model=model_info, calibration=calibration,
        num_batches=len(batches), hardware=hardware, formats=fmts,
        settings={"probes": probes, "seed": seed, "sqnr_floor_db": bench.SQNR_FLOOR_DB,
                  "m_bucketing": "next power of two", "loss": _loss_description(loss_fn, batches, probes)},
        stage_seconds=seconds, layers=stats)


def _solve(stats: SearchStats, budget: float, objective: str, rules: list[str],
           report: ProgressFn | None) -> tuple[solve.Solution, dict[str, str]]:
    groups = solve.group_layers(stats.layers, rules)
    stage = _stage(report, "solve")
    if stage is not None:
        stage(0.0, f"{len(set(groups.values()))} groups, objective={objective}, budget={budget:g}")
    solution = solve.solve(stats.costs(), budget, objective, groups)
    if stage is not None:
        for i, name in enumerate(stats.layers):
            stage((i + 1) / len(stats.layers), f"{name}: {solution.assignment[name]}")
    return solution, groups


def search(
    model: nn.Module,
    calibration,
    *,
    effective_bits: float | None = None,
    formats: Iterable[str] | None = None,
    objective: str = "balanced",
    loss_fn: Callable | None = None,
    groups: Sequence[str] | None = None,
    exclude: Iterable[str] | None = None,
    cache_dir: str | None = None,
    progress: bool | ProgressFn = True,
    refine_trials: int = 0,
    probes: int = sensitivity.PROBES,
    seed: int = 0,
) -> Plan:
    """Find the best format per layer for this model on this hardware; the model is not changed.

    ``effective_bits``: storage budget, bits per weight element averaged over the quantizable
    layers (default ``autoq.solve.DEFAULT_BUDGET`` = 6.0). ``objective``: ``"balanced"``,
    ``"accuracy"`` or ``"speed"`` (see ``autoq.solve``). ``formats``: candidate format names
    (default: all registered; ``none`` is always a candidate). ``groups``: regex rules with a
    capture group for layers that must share a format (default ``solve.DEFAULT_GROUP_RULES``).
    ``exclude``: regexes of layer names to leave out of the search. ``refine_trials``: when > 0,
    an NSGA-II study measuring the real loss on held-out batches (the last quarter of the
    calibration batches, not used for scoring) refines the plan. ``progress``: True for progress
    bars on stderr, False for silence, or a callable ``progress(stage, fraction, message)``
    whose exceptions propagate (use that to cancel).

    The result is cached under ``cache_dir``: a repeated call returns the cached plan
    (``plan.from_cache``); a new budget or objective re-solves from cached statistics.
    """
    report = _reporter(progress)
    try:
        return _search(model, calibration, effective_bits=effective_bits, formats=formats,
                       objective=objective, loss_fn=loss_fn, groups=groups, exclude=exclude,
                       cache_dir=cache_dir, report=report, refine_trials=refine_trials,
                       probes=probes, seed=seed)
    finally:
        if isinstance(report, _RichProgress):
            report.close()


def _search(model, calibration, *, effective_bits, formats, objective, loss_fn, groups, exclude,
            cache_dir, report, refine_trials, probes, seed) -> Plan:
    budget = _budget(effective_bits)
    objective = _objective(objective)
    fmts = _formats(formats)
    rules = list(solve.DEFAULT_GROUP_RULES if groups is None else groups)
    solve.group_layers([], rules)  # validate the rules before any work
    if not isinstance(refine_trials, int) or refine_trials < 0:
        raise ValueError(f"refine_trials must be a non-negative integer, got {refine_trials!r}")
    batches = as_batches(calibration)
    exclude = list(exclude or [])
    layers = quantizable_layers(model, exclude=exclude)
    if not layers:
        raise ValueError("the model has no quantizable layers (nn.Linear or GPT-2 Conv1D) left to search"
                         + (f" after exclude={exclude}" if exclude else ""))
    holdout: list = []
    if refine_trials:
        if len(batches) < 2:
            raise ValueError("refine_trials needs at least 2 calibration batches (one is held out)")
        n_hold = max(1, len(batches) // 4)
        batches, holdout = batches[:-n_hold], batches[-n_hold:]

    device = profile.model_device(model)
    hardware = bench.hardware_info(device)
    shapes = {name: layer_shape(m) for name, m in layers.items()}
    model_info = ModelInfo(architecture=type(model).__name__, fingerprint=model_fingerprint(model, shapes))
    calibration_fp = fingerprint(batches + holdout)
    cache = PlanCache(cache_dir)
    stats_key = make_key("stats", model_info.fingerprint, calibration_fp, len(holdout), fmts, exclude,
                         _loss_identity(loss_fn), probes, seed, bench.SQNR_FLOOR_DB, hardware)
    plan_key = make_key("plan", stats_key, budget, objective, rules, refine_trials)

    cached = cache.get(plan_key)
    if cached is not None:
        cached.from_cache = True
        if report is not None:
            report("solve", 1.0, f"cached plan {plan_key}")
        return cached

    stats = cache.get_stats(stats_key)
    if stats is None:
        stats = _measure(model, batches, layers, fmts, loss_fn=loss_fn, probes=probes, seed=seed,
                         cache=cache, hardware=hardware, model_info=model_info,
                         calibration=calibration_fp, report=report)
        cache.put_stats(stats_key, stats)

    start = time.perf_counter()
    solution, group_map = _solve(stats, budget, objective, rules, report)
    seconds = {**stats.stage_seconds, "solve": time.perf_counter() - start}
    pareto = None
    notes = [f"layer {n} never ran on the calibration data: timed and scored as free"
             for n, layer in stats.layers.items() if not layer.shapes]
    if refine_trials:
        start = time.perf_counter()
        solution, pareto, refine_notes = _refine(model, holdout, layers, loss_fn, stats, solution, group_map,
                                                 budget, objective, refine_trials, cache, plan_key, seed, report)
        notes += refine_notes
        seconds["refine"] = time.perf_counter() - start
    plan = build_plan(stats, solution, budget=budget, objective=objective, group_rules=rules,
                      groups=group_map, pareto=pareto, notes=notes)
    plan.stage_seconds = seconds
    plan.cache_key = plan_key
    plan.settings = {**plan.settings, "stats_key": stats_key}
    cache.put(plan)
    return plan


def _refine(model, holdout, layers, loss_fn, stats, solution, group_map, budget, objective, trials,
            cache, plan_key, seed, report):
    costs = stats.costs()
    evaluate = sensitivity.LossEvaluator(model, holdout, layers, loss_fn)
    budgets = [b for b in (budget + step for step in REFINE_BUDGET_STEPS) if b > 0]
    front = solve.refine(costs, group_map, evaluate, budgets=budgets, objective=objective, trials=trials,
                         storage=cache.study_storage(), study_name=f"autoq-{plan_key}", seed=seed,
                         report=_stage(report, "refine"))
    # Keep the point with the lowest measured loss that honours the budget and the latency limit
    # the integer program honoured; the integer-program solution itself was one of the trials.
    latency_limit = max(solution.latency, solution.latency_unquantized) if objective != "accuracy" else math.inf
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


def autoquant(
    model: nn.Module,
    calibration,
    *,
    effective_bits: float | None = None,
    formats: Iterable[str] | None = None,
    objective: str = "balanced",
    loss_fn: Callable | None = None,
    groups: Sequence[str] | None = None,
    exclude: Iterable[str] | None = None,
    cache_dir: str | None = None,
    progress: bool | ProgressFn = True,
    refine_trials: int = 0,
    probes: int = sensitivity.PROBES,
    seed: int = 0,
) -> tuple[nn.Module, Plan]:
    """:func:`search` (or reuse a cached plan), then quantize ``model`` in place.

    Same arguments as :func:`search`; returns ``(model, plan)``."""
    plan = search(model, calibration, effective_bits=effective_bits, formats=formats, objective=objective,
                  loss_fn=loss_fn, groups=groups, exclude=exclude, cache_dir=cache_dir, progress=progress,
                  refine_trials=refine_trials, probes=probes, seed=seed)
    apply(model, plan)
    return model, plan


def resolve(plan: Plan, effective_bits: float | None = None, objective: str | None = None,
            groups: Sequence[str] | None = None) -> Plan:
    """Re-solve ``plan`` for another budget or objective from the statistics it carries, without
    the model. Omitted arguments keep the plan's own."""
    budget = _budget(plan.budget if effective_bits is None else effective_bits)
    objective = _objective(plan.objective if objective is None else objective)
    rules = list(plan.groups if groups is None else groups)
    stats = plan.stats()
    start = time.perf_counter()
    solution, group_map = _solve(stats, budget, objective, rules, None)
    new = build_plan(stats, solution, budget=budget, objective=objective, group_rules=rules, groups=group_map,
                     notes=[f"re-solved from plan {plan.cache_key or '(unsaved)'}"])
    new.stage_seconds = {**stats.stage_seconds, "solve": time.perf_counter() - start}
    stats_key = plan.settings.get("stats_key")
    if stats_key:
        new.settings = {**new.settings, "stats_key": stats_key}
        new.cache_key = make_key("plan", stats_key, budget, objective, rules, 0)
    return new
