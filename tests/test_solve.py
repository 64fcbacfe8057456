"""The integer program on synthetic numbers: exact against brute force, groups, objectives,
infeasible budgets, refinement."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from autoq import solve
from autoq.solve import InfeasibleBudget, LayerCosts

FORMAT_BITS = {"none": 16.0, "int8": 8.1, "int4a": 4.75, "int4b": 4.2}


def random_layers(seed: int, n: int = 6, drop: bool = False) -> dict[str, LayerCosts]:
    rng = random.Random(seed)
    layers = {}
    for i in range(n):
        numel = rng.choice([1, 2, 4]) * 4096
        base = numel * rng.uniform(0.8, 1.2) * 1e-9
        latency = {"none": base, "int8": base * rng.uniform(0.4, 1.3), "int4a": base * rng.uniform(0.6, 2.5),
                   "int4b": base * rng.uniform(0.6, 2.5)}
        score = {"none": 0.0, "int8": rng.uniform(0.0, 0.2), "int4a": rng.uniform(0.2, 2.0),
                 "int4b": rng.uniform(0.3, 3.0)}
        bits = dict(FORMAT_BITS)
        if drop and i == 0:  # a format dropped for this layer: absent from its dicts
            for d in (latency, score, bits):
                del d["int4b"]
        layers[f"layer{i}"] = LayerCosts(numel, bits, score, latency)
    return layers


def assignments(layers, groups=None):
    """Every assignment that respects the groups and the candidates."""
    groups = groups or {}
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(groups.get(name, name), []).append(name)
    keys = list(members)
    options = [sorted(set.intersection(*(layers[n].candidates() for n in members[k]))) for k in keys]
    for combo in itertools.product(*options):
        yield {name: fmt for key, fmt in zip(keys, combo, strict=True) for name in members[key]}


def brute_force(layers, budget, objective, groups=None, margin=0.0):
    """The optimum value under the semantics documented in autoq.solve, limits shrunk by
    ``margin`` (relative)."""
    shrink = 1 - margin
    rows = []
    for a in assignments(layers, groups):
        rows.append((solve.effective_bits(layers, a), solve.total_score(layers, a),
                     solve.total_latency(layers, a)))
    fits = [r for r in rows if r[0] <= budget * shrink]
    if objective == "accuracy":
        return min(r[1] for r in fits)
    if objective == "speed":
        cap = solve.SCORE_FACTOR * min(r[1] for r in fits)
        return min(r[2] for r in fits if r[1] <= cap * shrink)
    base = solve.unquantized_latency(layers)
    fast = [r for r in fits if r[2] <= base * shrink]
    if fast:
        return min(r[1] for r in fast)
    limit = min(r[2] for r in fits) * (1 + solve.LATENCY_SLACK)
    return min(r[1] for r in fits if r[2] <= limit * shrink)


def assert_optimal(solution, layers, budget, objective, groups=None):
    """Never better than the true optimum, never worse than the optimum a hair (1e-6) inside
    the limits (the solver's documented safety margin)."""
    got = value(solution, objective)
    best = brute_force(layers, budget, objective, groups)
    inside = brute_force(layers, budget, objective, groups, margin=1e-6)
    assert best * (1 - 1e-5) - 1e-12 <= got <= inside * (1 + 1e-5) + 1e-12, (budget, objective, got, best, inside)


def value(solution, objective):
    return solution.latency if objective == "speed" else solution.score


@pytest.mark.parametrize("objective", solve.OBJECTIVES)
@pytest.mark.parametrize("seed", range(6))
def test_exact_against_brute_force(seed, objective):
    layers = random_layers(seed, drop=seed % 2 == 1)
    for budget in (4.6, 5.5, 7.0, 9.0, 12.0):
        solution = solve.solve(layers, budget, objective)
        assert solution.effective_bits <= budget
        assert_optimal(solution, layers, budget, objective)
        assert solution.effective_bits == pytest.approx(solve.effective_bits(layers, solution.assignment))


@pytest.mark.parametrize("objective", solve.OBJECTIVES)
def test_groups_share_one_format_and_stay_exact(objective):
    layers = random_layers(11, n=7)
    groups = {"layer0": "g1", "layer1": "g1", "layer2": "g1", "layer4": "g2", "layer5": "g2"}
    for budget in (5.0, 6.0, 8.5):
        solution = solve.solve(layers, budget, objective, groups)
        a = solution.assignment
        assert a["layer0"] == a["layer1"] == a["layer2"]
        assert a["layer4"] == a["layer5"]
        assert solution.effective_bits <= budget
        assert_optimal(solution, layers, budget, objective, groups)


def test_group_candidates_are_the_intersection():
    layers = random_layers(3, n=3, drop=True)  # layer0 cannot take int4b
    groups = {"layer0": "g", "layer1": "g"}
    solution = solve.solve(layers, solve.smallest_budget(layers, groups) + 1e-3, "accuracy", groups)
    assert solution.assignment["layer0"] == solution.assignment["layer1"] == "int4a"
    assert solution.assignment["layer2"] == "int4b"


def test_objectives_trade_as_documented():
    for seed in range(4):
        layers = random_layers(seed)
        base = solve.unquantized_latency(layers)
        for budget in (5.0, 6.0, 9.0):
            accuracy = solve.solve(layers, budget, "accuracy")
            speed = solve.solve(layers, budget, "speed")
            balanced = solve.solve(layers, budget, "balanced")
            assert accuracy.score <= min(speed.score, balanced.score) + 1e-12
            assert speed.latency <= accuracy.latency + 1e-15
            assert speed.score <= solve.SCORE_FACTOR * accuracy.score * (1 + 1e-9)
            if balanced.notes:
                fastest = min(solve.total_latency(layers, a) for a in assignments(layers)
                              if solve.effective_bits(layers, a) <= budget)
                assert fastest > base
                assert balanced.latency <= fastest * (1 + solve.LATENCY_SLACK) * (1 + 1e-9)
            else:
                assert balanced.latency <= base


def test_balanced_relaxes_the_latency_limit_when_the_budget_forbids_it():
    # Every quantized format is slower than float: no plan under 8 bits can match its latency.
    layers = {f"l{i}": LayerCosts(4096, dict(FORMAT_BITS), {"none": 0, "int8": 0.1 * (i + 1), "int4a": 1.0 + i,
                                                            "int4b": 2.0 + i},
                                  {"none": 1.0, "int8": 1.5, "int4a": 2.0 + 0.1 * i, "int4b": 2.1})
              for i in range(4)}
    solution = solve.solve(layers, 6.0, "balanced")
    assert solution.notes and "as fast as the unquantized model" in solution.notes[0]
    assert solution.score == pytest.approx(brute_force(layers, 6.0, "balanced"))


def test_infeasible_budget_names_the_smallest_feasible_one():
    layers = random_layers(2)
    smallest = min(solve.effective_bits(layers, a) for a in assignments(layers))
    with pytest.raises(InfeasibleBudget) as info:
        solve.solve(layers, 3.0, "accuracy")
    assert smallest < info.value.smallest <= smallest + 1.01e-3
    assert f"{info.value.smallest:.3f} bits" in str(info.value)
    assert solve.smallest_budget(layers) == pytest.approx(smallest)
    for objective in solve.OBJECTIVES:  # the budget the error names works
        assert solve.solve(layers, info.value.smallest, objective).effective_bits <= info.value.smallest


def test_bad_arguments():
    layers = random_layers(0)
    with pytest.raises(ValueError, match="unknown objective"):
        solve.solve(layers, 6.0, "fastest")
    for budget in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            solve.solve(layers, budget, "accuracy")
    with pytest.raises(ValueError, match="no quantizable layers"):
        solve.solve({}, 6.0, "accuracy")


def test_default_budget():
    layers = random_layers(4)
    assert solve.solve(layers).effective_bits <= solve.DEFAULT_BUDGET


def test_group_rules():
    names = [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
        "encoder.layer.1.attention.self.query",
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj", "transformer.h.0.attn.c_attn",
    ]
    g = solve.group_layers(names)
    assert g[names[0]] == g[names[1]] == g[names[2]] != g[names[4]]
    assert g[names[3]] == names[3]  # ungrouped: its own group
    assert g[names[5]] == g[names[6]] == g[names[7]] != g[names[8]]
    assert g[names[9]] == g[names[10]] != g[names[11]]
    assert g[names[12]] == names[12]
    custom = solve.group_layers(names, [r"(.*)\.attention\.(self\.query|output\.dense)$"])
    assert custom[names[0]] == custom[names[3]]
    assert solve.group_layers(names, []) == {n: n for n in names}
    with pytest.raises(ValueError, match="capture group"):
        solve.group_layers(names, [r".*\.mlp\..*"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        solve.group_layers(names, [r"(unclosed"])


def test_refine_returns_a_pareto_front_and_resumes(tmp_path):
    layers = random_layers(7, n=5)
    calls = []

    def evaluate(assignment):
        calls.append(dict(assignment))
        return solve.total_score(layers, assignment) + 0.01 * len(calls) % 0.05

    storage = f"sqlite:///{tmp_path / 'refine.db'}"
    front = solve.refine(layers, None, evaluate, budgets=[5.0, 6.0, 8.0], objective="accuracy", trials=12,
                         storage=storage, study_name="t")
    assert len(calls) == 12
    # The integer-program solutions were tried first.
    assert calls[0] == solve.solve(layers, 5.0, "accuracy").assignment
    assert front
    for point in front:
        assert point.effective_bits == pytest.approx(solve.effective_bits(layers, point.assignment))
        assert point.latency == pytest.approx(solve.total_latency(layers, point.assignment))
        dominated = any(o.loss <= point.loss and o.effective_bits <= point.effective_bits
                        and o.latency <= point.latency and
                        (o.loss, o.effective_bits, o.latency) != (point.loss, point.effective_bits, point.latency)
                        for o in front)
        assert not dominated
    # Resuming the stored study runs only the missing trials.
    solve.refine(layers, None, evaluate, budgets=[6.0], objective="accuracy", trials=12, storage=storage,
                 study_name="t")
    assert len(calls) == 12
    solve.refine(layers, None, evaluate, budgets=[6.0], objective="accuracy", trials=15, storage=storage,
                 study_name="t")
    assert len(calls) == 15
