"""Plan JSON, the on-disk cache and resolve, on synthetic statistics (no model needed)."""

from __future__ import annotations

import json
import multiprocessing
import warnings

import pytest

from autoq import resolve, solve
from autoq.cache import PlanCache
from autoq.config import plan_key
from autoq.plan import LayerStats, ModelInfo, Plan, SearchStats, ShapeCount, build_plan

BITS = {"none": 16.0, "int8_dynamic": 8.0625, "int4_g128": 4.1875}


def synthetic_stats() -> SearchStats:
    layers = {}
    for block in range(2):
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            name = f"model.layers.{block}.self_attn.{proj}"
            layers[name] = LayerStats(
                out_features=128, in_features=128, numel=128 * 128, dtype="float32",
                shapes=[ShapeCount(m=32, k=128, count=2)], bits=dict(BITS),
                latency={"none": 1e-4, "int8_dynamic": 0.6e-4, "int4_g128": 2e-4},
                sensitivity={"none": 0.0, "int8_dynamic": 0.01 * (i + 1 + block), "int4_g128": 0.5 * (i + 1)},
                dropped={"int4_g64": "output SQNR 3.0 dB on the recorded activations is below the 10 dB floor"})
    return SearchStats(autoq_version="0.1.0", model=ModelInfo(architecture="Tiny", fingerprint="abc"),
                       calibration="cal", num_batches=2, hardware={"device": "cpu", "name": "test cpu"},
                       formats=list(BITS), settings={"probes": 8}, layers=layers)


def synthetic_plan(budget: float = 8.0, objective: str = "accuracy", key: str = "k1") -> Plan:
    stats = synthetic_stats()
    groups = solve.group_layers(stats.layers)
    solution = solve.solve(stats.costs(), budget, objective, groups)
    plan = build_plan(stats, solution, budget=budget, objective=objective,
                      group_rules=list(solve.DEFAULT_GROUP_RULES), groups=groups)
    plan.cache_key = key
    plan.settings = {**plan.settings, "stats_key": "s1"}
    return plan


def test_plan_fields_and_json_round_trip(tmp_path):
    plan = synthetic_plan()
    assert plan.effective_bits <= 8.0
    assignment = plan.assignment()
    assert set(assignment) == set(plan.layers)
    name = "model.layers.0.self_attn.q_proj"
    layer = plan.layers[name]
    assert layer.format == assignment[name]
    assert layer.sensitivity["int4_g128"] == 0.5 and layer.latency["none"] == 1e-4
    assert layer.dropped["int4_g64"].startswith("output SQNR")
    assert (plan.layers["model.layers.0.self_attn.q_proj"].format == plan.layers["model.layers.0.self_attn.k_proj"].format
            == plan.layers["model.layers.0.self_attn.v_proj"].format)
    assert plan.totals.size_bytes < plan.totals.size_bytes_unquantized

    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and "from_cache" not in data
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.assignment() == assignment
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_summary_is_a_readable_table():
    plan = synthetic_plan()
    text = plan.summary()
    for name, layer in plan.layers.items():
        assert name in text and layer.format in text
    assert "effective bits" in text and "output SQNR" in text


def test_load_rejects_what_is_not_a_plan(tmp_path):
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.load(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        Plan.load(bad)
    bad.write_text(json.dumps({"version": 1, "budget": "x"}))
    with pytest.raises(ValueError, match="not a valid plan"):
        Plan.load(bad)


def test_resolve_re_solves_without_the_model():
    plan = synthetic_plan(budget=8.0)
    for budget in (4.5, 6.0, 12.0):
        for objective in solve.OBJECTIVES:
            new = resolve(plan, effective_bits=budget, objective=objective)
            assert new.effective_bits <= budget
            assert new.budget == budget and new.objective == objective
            expected = solve.solve(plan.stats().costs(), budget, objective, solve.group_layers(plan.layers))
            assert new.assignment() == expected.assignment
            assert new.cache_key == plan_key("s1", budget, objective, solve.DEFAULT_GROUP_RULES, 0)
    assert resolve(plan).assignment() == plan.assignment()  # same budget and objective: same answer
    with pytest.raises(solve.InfeasibleBudget, match="smallest feasible budget"):
        resolve(plan, effective_bits=3.0)
    with pytest.raises(ValueError, match="unknown objective"):
        resolve(plan, objective="smallest")


def test_cache_put_get_list(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.get("nothing") is None
    plan = synthetic_plan(key="k1")
    cache.put(plan)
    got = cache.get("k1")
    assert got == plan and got.cache_key == "k1"
    cache.put(synthetic_plan(budget=6.0, key="k2"))
    listed = cache.list()
    assert {e["key"] for e in listed} == {"k1", "k2"}
    entry = next(e for e in listed if e["key"] == "k2")
    assert entry["architecture"] == "Tiny" and entry["budget"] == 6.0 and entry["objective"] == "accuracy"
    assert entry["effective_bits"] <= 6.0 and entry["created"] and entry["hardware"] == "test cpu"

    stats = synthetic_stats()
    cache.put_stats("s1", stats)
    assert cache.get_stats("s1") == stats
    cache.add_timings("hw", {"a|1|2|16|float32": 1.0})
    cache.add_timings("hw", {"b|1|2|16|float32": 2.0})
    assert cache.timings("hw") == {"a|1|2|16|float32": 1.0, "b|1|2|16|float32": 2.0}


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOQ_CACHE_DIR", str(tmp_path / "env"))
    assert PlanCache().root == tmp_path / "env"
    assert PlanCache(tmp_path / "arg").root == tmp_path / "arg"


def test_corrupt_entries_are_reported_removed_and_rebuilt(tmp_path):
    cache = PlanCache(tmp_path)
    cache.put(synthetic_plan(key="k1"))
    path = tmp_path / "plans" / "k1.json"
    path.write_text(path.read_text()[:200])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get("k1") is None
    assert not path.exists()
    cache.put(synthetic_plan(key="k1"))  # rebuilt
    assert cache.get("k1") is not None
    assert [e["key"] for e in cache.list()] == ["k1"]

    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "s.json").write_text('{"version": 1}')
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get_stats("s") is None
    (tmp_path / "timings").mkdir()
    (tmp_path / "timings" / "hw.json").write_text('["not", "a", "table"]')
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.timings("hw") == {}


def _writer(root: str, budget: float, rounds: int) -> None:
    cache = PlanCache(root)
    plan = synthetic_plan(budget=budget, key="shared")
    for _ in range(rounds):
        cache.put(plan)


def test_concurrent_writers_never_leave_a_partial_file(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(str(tmp_path), budget, 40)) for budget in (5.0, 6.0, 8.0)]
    for w in writers:
        w.start()
    cache = PlanCache(tmp_path)
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt read would warn: fail instead
        while any(w.is_alive() for w in writers):
            plan = cache.get("shared")
            if plan is not None:
                seen.add(plan.budget)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert cache.get("shared").budget in {5.0, 6.0, 8.0}
    assert seen <= {5.0, 6.0, 8.0}
    assert not list((tmp_path / "plans").glob(".*"))
