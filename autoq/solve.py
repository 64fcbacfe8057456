"""Choose one format per layer group: an exact integer program over measured numbers.

This module knows numbers, not models. Each layer brings its weight size ``numel`` and, per
candidate format, its storage ``bits`` per weight element, its sensitivity ``score`` and its
measured ``latency``. The solver picks one format per *group* (layers that must share a format)
with ``scipy.optimize.milp`` (HiGHS, relative gap 0, so the optimum is exact):

- effective bits = Σ bits(f)·numel / Σ numel over all layers (``none`` counts as 16);
- ``"accuracy"``: minimise Σ score subject to effective bits <= budget;
- ``"speed"``: minimise Σ latency subject to the budget and to Σ score <= ``score_factor`` times
  the accuracy-optimal score at the same budget (default 2: roughly 3 dB more output noise than
  the most accurate plan, never a wrecked model);
- ``"balanced"`` (default): minimise Σ score subject to the budget and to Σ latency no worse
  than the unquantized model's. When the budget makes that impossible (on CPUs the 4-bit kernels
  compute in bf16 and are slower than fp32, so a tight budget forces a slower model), the
  latency limit becomes the fastest plan within the budget plus ``latency_slack`` (default 10%),
  and the plan says so in its notes.

Ties: accuracy-first programs carry a tiny (1e-6 relative) latency term, so e.g. a layer whose
formats all score zero takes the fastest; "speed" is solved lexicographically (fastest, then the
most accurate among plans as fast to 0.01 %) as two programs. Formats another format matches or
beats on bits, score and latency at once are removed first (this never changes the optimum).
Limits are kept by a 1e-6 relative margin, checked exactly afterwards. Each program has a
``TIME_LIMIT_S`` safety limit; hitting it (never seen on MiniLM, whose programs take 0.01-1 s)
returns the best assignment found with a note saying it is not proven optimal.

An infeasible budget raises :class:`InfeasibleBudget` naming the smallest feasible budget.

Groups come from regex rules with a capture group (:func:`group_layers`); layers whose names
match the same rule with the same captured text share one format. The defaults group q/k/v of
one attention block and gate/up of one MLP; pass your own list to replace them.

:func:`refine` optionally improves on the integer program with an optuna NSGA-II study that
measures the real end-to-end loss (a callback supplied by the caller) and returns the Pareto front
(loss, effective bits, latency).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

DEFAULT_BUDGET = 6.0
OBJECTIVES = ("accuracy", "speed", "balanced")
SCORE_FACTOR = 2.0
LATENCY_SLACK = 0.10
UNQUANTIZED = "none"

DEFAULT_GROUP_RULES: tuple[str, ...] = (
    r"(.*\.attention\.self)\.(query|key|value)$",  # BERT-style q/k/v
    r"(.*\.self_attn)\.(q_proj|k_proj|v_proj)$",  # Llama, Mistral, Qwen, OPT q/k/v
    r"(.*\.mlp)\.(gate_proj|up_proj)$",  # gated MLPs: gate and up read the same input
)

_TIE = 1e-6  # weight of the secondary objective
TIME_LIMIT_S = 20.0  # per integer program; MiniLM's take 0.01-1 s


class InfeasibleBudget(ValueError):
    """No assignment satisfies the budget; ``smallest`` is the smallest budget that would."""

    def __init__(self, message: str, smallest: float):
        super().__init__(message)
        self.smallest = smallest


@dataclass
class LayerCosts:
    """What the solver needs to know about one layer; every dict has one entry per candidate."""

    numel: int
    bits: dict[str, float]
    score: dict[str, float]
    latency: dict[str, float]

    def candidates(self) -> set[str]:
        return set(self.bits) & set(self.score) & set(self.latency)


@dataclass
class Solution:
    assignment: dict[str, str]
    effective_bits: float
    score: float
    latency: float
    latency_unquantized: float
    notes: list[str] = field(default_factory=list)


@dataclass
class ParetoPoint:
    loss: float
    effective_bits: float
    latency: float
    assignment: dict[str, str]


# ----------------------------------------------------------------------------------- groups


def group_layers(names: Iterable[str], rules: Sequence[str] | None = None) -> dict[str, str]:
    """``{layer: group key}``. The first rule that matches (``re.search``) a name decides its
    group: ``"<rule index>:<captured text>"``; a layer matching no rule is its own group."""
    rules = DEFAULT_GROUP_RULES if rules is None else tuple(rules)
    compiled = []
    for rule in rules:
        try:
            pattern = re.compile(rule)
        except re.error as err:
            raise ValueError(f"group rule {rule!r} is not a valid regular expression: {err}") from None
        if pattern.groups < 1:
            raise ValueError(f"group rule {rule!r} needs a capture group, e.g. r'(.*\\.mlp)\\.(gate|up)'")
        compiled.append(pattern)
    groups = {}
    for name in names:
        groups[name] = name
        for index, pattern in enumerate(compiled):
            found = pattern.search(name)
            if found:
                groups[name] = f"{index}:{found.group(1)}"
                break
    return groups


# ------------------------------------------------------------------------------- arithmetic


def effective_bits(layers: Mapping[str, LayerCosts], assignment: Mapping[str, str]) -> float:
    total = sum(c.numel for c in layers.values())
    return sum(c.bits[assignment[n]] * c.numel for n, c in layers.items()) / total


def total_score(layers: Mapping[str, LayerCosts], assignment: Mapping[str, str]) -> float:
    return sum(c.score[assignment[n]] for n, c in layers.items())


def total_latency(layers: Mapping[str, LayerCosts], assignment: Mapping[str, str]) -> float:
    return sum(c.latency[assignment[n]] for n, c in layers.items())


def unquantized_latency(layers: Mapping[str, LayerCosts]) -> float:
    missing = [n for n, c in layers.items() if UNQUANTIZED not in c.latency]
    if missing:
        raise ValueError(f"layers {missing[:3]} have no timing for the unquantized format 'none'")
    return sum(c.latency[UNQUANTIZED] for c in layers.values())


# -------------------------------------------------------------------------- integer program


class _Program:
    """The 0/1 program over one variable per (group, candidate format)."""

    def __init__(self, layers: Mapping[str, LayerCosts], groups: Mapping[str, str] | None):
        if not layers:
            raise ValueError("nothing to solve: no quantizable layers")
        self.layers = layers
        groups = dict(groups or {})
        members: dict[str, list[str]] = {}
        for name in layers:
            members.setdefault(groups.get(name, name), []).append(name)
        self.members = members
        self.variables: list[tuple[str, str]] = []
        for key, names in members.items():
            shared = set.intersection(*(layers[n].candidates() for n in names))
            if not shared:
                raise ValueError(f"layers {names} must share a format but have no candidate in common")
            self.variables += [(key, fmt) for fmt in _undominated(layers, names, sorted(shared))]
        self.total_numel = sum(c.numel for c in layers.values())
        self.unproven = False
        self.bits = self._row(lambda c, f: c.bits[f] * c.numel / self.total_numel)
        self.score = self._row(lambda c, f: c.score[f])
        self.latency = self._row(lambda c, f: c.latency[f])
        self.one_hot = np.zeros((len(members), len(self.variables)))
        index = {key: i for i, key in enumerate(members)}
        for j, (key, _) in enumerate(self.variables):
            self.one_hot[index[key], j] = 1.0

    def _row(self, value: Callable[[LayerCosts, str], float]) -> np.ndarray:
        return np.array([sum(value(self.layers[n], fmt) for n in self.members[key])
                         for key, fmt in self.variables], dtype=float)

    def minimise(self, primary: np.ndarray, secondary: np.ndarray | None,
                 limits: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
        """Binary x minimising primary·x (+ a tiny secondary·x) with row·x <= limit; None if infeasible.

        Each limit is tightened by a hair (1e-6 relative) so that HiGHS's feasibility tolerance
        (1e-7) can never return a plan a rounding error over budget; the result is checked
        exactly and, should a limit still be exceeded, solved again with a wider margin.
        """
        c = _normalised(primary)
        if secondary is not None:
            c = c + _TIE * _normalised(secondary)
        n = len(self.variables)
        for margin in (1e-6, 1e-5, 1e-4):
            constraints = [LinearConstraint(self.one_hot, 1.0, 1.0)]
            for row, limit in limits:
                scale = max(float(np.abs(row).max()), 1e-30)
                bound = limit / scale - margin * max(1.0, abs(limit / scale))
                constraints.append(LinearConstraint((row / scale)[None, :], -np.inf, bound))
            # Presolve off: on these small programs HiGHS 1.12's presolve-postsolve path returned
            # a slightly suboptimal assignment (checked against an exact dynamic program).
            with _quiet_c_stdout():
                result = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                              options={"mip_rel_gap": 0.0, "presolve": False, "time_limit": TIME_LIMIT_S})
            if result.status == 1 and result.x is not None:  # time limit: best found, not proven
                self.unproven = True
            elif result.status == 2 or result.x is None:  # 2: infeasible
                return None
            elif result.status != 0:
                raise RuntimeError(f"the integer program did not solve: {result.message}")
            x = np.round(result.x)
            if all(float(row @ x) <= limit for row, limit in limits):
                return x
        raise RuntimeError("the integer program kept exceeding a limit by more than its tolerance")

    def assignment(self, x: np.ndarray) -> dict[str, str]:
        chosen = {key: fmt for (key, fmt), v in zip(self.variables, x, strict=True) if v > 0.5}
        return {name: chosen[key] for key, names in self.members.items() for name in names}

    def smallest_bits(self, limits: list[tuple[np.ndarray, float]]) -> float | None:
        x = self.minimise(self.bits, None, limits)
        return None if x is None else float(self.bits @ x)


@contextmanager
def _quiet_c_stdout():
    """Silence C-level stdout while HiGHS runs: 1.12 prints a stray debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...", ERGO-Code/HiGHS#2783) that
    would otherwise land in the middle of our output."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capture, notebooks)
        fd = 1
    sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _undominated(layers: Mapping[str, LayerCosts], names: list[str], fmts: list[str]) -> list[str]:
    """Drop formats another format matches or beats on bits, score and latency at once.

    Every objective and limit here is monotone in those three, so swapping a dominated format
    for its dominator never hurts: the optimum is unchanged, and the program is smaller (on
    MiniLM this turned a 1.4 s solve into a fraction of that).
    """
    def totals(fmt: str) -> tuple[float, float, float]:
        return (sum(layers[n].bits[fmt] * layers[n].numel for n in names),
                sum(layers[n].score[fmt] for n in names), sum(layers[n].latency[fmt] for n in names))

    values = {fmt: totals(fmt) for fmt in fmts}
    kept = []
    for fmt in fmts:
        v = values[fmt]
        dominated = any(
            all(o <= m for o, m in zip(values[other], v, strict=True))
            and (values[other] != v or other < fmt)  # of exact equals, keep the first name
            for other in fmts if other != fmt)
        if not dominated:
            kept.append(fmt)
    return kept


def _normalised(row: np.ndarray) -> np.ndarray:
    scale = float(np.abs(row).max()) if row.size else 0.0
    return row / scale if scale > 0 else row


def solve(
    layers: Mapping[str, LayerCosts],
    budget: float | None = None,
    objective: str = "balanced",
    groups: Mapping[str, str] | None = None,
    *,
    score_factor: float = SCORE_FACTOR,
    latency_slack: float = LATENCY_SLACK,
) -> Solution:
    """The exact optimum of ``objective`` under ``budget`` effective bits (see module docstring)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"effective_bits must be a positive number of bits, got {budget}")
    program = _Program(layers, groups)
    base_latency = unquantized_latency(layers)
    budget_limit = (program.bits, budget)
    notes: list[str] = []

    best = program.minimise(program.score, program.latency, [budget_limit])
    if best is None:
        smallest = program.smallest_bits([])
        assert smallest is not None  # with no limits every one-hot choice is feasible
        # Rounded up to 3 decimals (past the solver's 1e-6 safety margin), so it is a budget that works.
        feasible = math.ceil(smallest * (1 + 2e-6) * 1000) / 1000
        raise InfeasibleBudget(
            f"effective_bits={budget:g} is infeasible: the smallest feasible budget for these layers "
            f"and formats is {feasible:.3f} bits", feasible)

    if objective == "accuracy":
        x = best
    elif objective == "speed":
        cap = float(program.score @ best) * score_factor
        cap = max(cap, 1e-12 * max(float(program.score.max()), 1e-30))
        x = _fastest_then_most_accurate(program, [budget_limit, (program.score, cap)])
        if x is None:  # the cap is at least the optimum's score, so only tolerance can get here
            x = best
        notes.append(f"score capped at {score_factor:g}x the accuracy-optimal score at this budget")
    else:
        x = program.minimise(program.score, program.latency,
                             [budget_limit, (program.latency, base_latency)])
        if x is None:
            fastest = program.minimise(program.latency, None, [budget_limit])
            limit = float(program.latency @ fastest) * (1 + latency_slack)
            x = program.minimise(program.score, program.latency,
                                 [budget_limit, (program.latency, limit)])
            if x is None:
                x = fastest
            notes.append(
                f"no plan within {budget:g} bits is as fast as the unquantized model (the fastest is "
                f"{float(program.latency @ fastest) / base_latency:.2f}x its latency); latency was "
                f"limited to the fastest plan + {latency_slack:.0%} instead")
    if program.unproven:
        notes.append(f"an integer program hit its {TIME_LIMIT_S:g} s limit: the plan is the best found, "
                     "not proven optimal")
    assignment = program.assignment(x)
    bits = effective_bits(layers, assignment)
    if bits > budget:  # pragma: no cover - guarded by the margin in minimise
        raise RuntimeError(f"solver returned {bits!r} bits for a {budget} bit budget")
    return Solution(assignment, bits, total_score(layers, assignment), total_latency(layers, assignment),
                    base_latency, notes)


def _fastest_then_most_accurate(program: _Program, limits: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """Lexicographic: the least latency, then the least score among plans that fast.

    Done as two programs rather than one with a tie-breaking term: layers of the same shape have
    identical timings, and a tiny score term over those ties made HiGHS spend seconds proving
    optimality."""
    fastest = program.minimise(program.latency, None, limits)
    if fastest is None:
        return None
    limit = float(program.latency @ fastest) * (1 + 1e-4)  # "as fast", to 0.01 %
    x = program.minimise(program.score, None, [*limits, (program.latency, limit)])
    return fastest if x is None else x


def smallest_budget(layers: Mapping[str, LayerCosts], groups: Mapping[str, str] | None = None) -> float:
    """The fewest effective bits any assignment reaches (each group at its smallest format)."""
    smallest = _Program(layers, groups).smallest_bits([])
    assert smallest is not None
    return smallest


# ------------------------------------------------------------------------------- refinement


def refine(
    layers: Mapping[str, LayerCosts],
    groups: Mapping[str, str] | None,
    evaluate: Callable[[dict[str, str]], float],
    *,
    budgets: Sequence[float],
    objective: str,
    trials: int,
    storage: str | None = None,
    study_name: str = "autoq-refine",
    seed: int = 0,
    report: Callable[[float, str], None] | None = None,
) -> list[ParetoPoint]:
    """Search around the integer-program solutions with NSGA-II, measuring the real loss.

    The study has one categorical parameter per group and three objectives, all minimised:
    ``evaluate(assignment)`` (the caller's end-to-end loss on held-out data), effective bits and
    predicted latency. It is seeded with the integer-program solutions for ``budgets``. With
    ``storage`` (an optuna RDB URL such as ``sqlite:///refine.db``) a study of the same name is
    resumed: only the trials still missing to reach ``trials`` are run. Returns the Pareto front.
    """
    import optuna

    program = _Program(layers, groups)
    choices = {key: sorted({fmt for k, fmt in program.variables if k == key}) for key in program.members}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True,
        directions=["minimize", "minimize", "minimize"],
        sampler=optuna.samplers.NSGAIISampler(seed=seed),
    )
    if not study.trials:
        for budget in budgets:
            try:
                solution = solve(layers, budget, objective, groups)
            except InfeasibleBudget:
                continue
            study.enqueue_trial({key: solution.assignment[names[0]] for key, names in program.members.items()})

    def objective_fn(trial) -> tuple[float, float, float]:
        per_group = {key: trial.suggest_categorical(key, choices[key]) for key in program.members}
        assignment = {name: per_group[key] for key, names in program.members.items() for name in names}
        loss = float(evaluate(assignment))
        return loss, effective_bits(layers, assignment), total_latency(layers, assignment)

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for i in range(done, trials):
        if report is not None:
            report(i / max(trials, 1), f"trial {i + 1}/{trials}")
        study.optimize(objective_fn, n_trials=1, catch=())
    if report is not None:
        report(1.0, f"{trials} trials")
    front = []
    for t in study.best_trials:
        assignment = {name: t.params[key] for key, names in program.members.items() for name in names}
        front.append(ParetoPoint(t.values[0], t.values[1], t.values[2], assignment))
    return sorted(front, key=lambda p: (p.effective_bits, p.loss))
