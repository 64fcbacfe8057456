"""SearchConfig, cache keys that miss when they must, the pipeline, and regression tests for
defects a code review found (each failed on the code before the fix)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from test_plan import synthetic_stats
from torch import nn

import autoq
from autoq import api, solve
from autoq.config import SearchConfig, loss_identity
from autoq.stages import Stage


class TwoLayers(nn.Module):
    def __init__(self, k: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(k, 64)
        self.second = nn.Linear(64, 32)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


FAST = {"formats": ["int8_weight_only", "int4_g32"], "effective_bits": 9.0, "progress": False}


def batches(seed: int = 0, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 64, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------- SearchConfig


def test_config_is_validated_once_and_frozen():
    config = SearchConfig(effective_bits=5, formats=["int4_g64"])
    assert config.effective_bits == 5.0 and config.formats == ("none", "int4_g64")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.objective = "speed"
    for bad, match in [({"objective": "fast"}, "unknown objective"), ({"effective_bits": 0}, "positive"),
                       ({"formats": ["int3"]}, "unknown format"), ({"groups": ["no-capture"]}, "capture"),
                       ({"refine_trials": -1}, "non-negative"), ({"probes": 0}, "positive")]:
        with pytest.raises(ValueError, match=match):
            SearchConfig(**bad)
    with pytest.raises(TypeError, match="unknown search setting.*budget"):
        SearchConfig.build(budget=4)
    assert SearchConfig.build(config, objective="speed").objective == "speed"
    assert SearchConfig.build(config) is config


def test_search_and_autoquant_take_a_config_or_its_fields(tmp_path):
    model = TwoLayers()
    config = SearchConfig(effective_bits=8.0, cache_dir=str(tmp_path), formats=FAST["formats"])
    plan = autoq.search(model, batches(), config, progress=False)
    again = autoq.search(model, batches(), effective_bits=8.0, cache_dir=str(tmp_path),
                         formats=FAST["formats"], progress=False)
    assert again.from_cache and again.cache_key == plan.cache_key
    quantized, applied = autoq.autoquant(model, batches(), config, progress=False)
    assert applied.cache_key == plan.cache_key and autoq.layer_formats(quantized) == {
        n: f for n, f in plan.assignment().items() if f != "none"}


# ---------------------------------------------------------------------------- cache misses


def search_key(tmp_path, model=None, calibration=None, **settings) -> tuple[str, bool]:
    plan = autoq.search(model or TwoLayers(), calibration or batches(), cache_dir=str(tmp_path),
                        **{**FAST, **settings})
    return plan.settings["stats_key"], plan.from_cache


def test_every_budget_independent_input_misses_the_statistics_cache(tmp_path):
    base, _ = search_key(tmp_path)
    assert search_key(tmp_path) == (base, True)
    changed = {
        "weights": search_key(tmp_path, model=TwoLayers(seed=1))[0],
        "calibration": search_key(tmp_path, calibration=batches(seed=1))[0],
        "formats": search_key(tmp_path, formats=["int8_weight_only"])[0],
        "probes": search_key(tmp_path, probes=4)[0],
        "seed": search_key(tmp_path, seed=3)[0],
        "exclude": search_key(tmp_path, exclude=["second"])[0],
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)


def scaled(scale: float, output, batch):
    return output.pow(2).mean() * scale


def closure_loss(scale: float):
    def loss(output, batch):
        return output.pow(2).mean() * scale
    return loss


class ModuleLoss(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, output, batch):
        return output.pow(2).mean() * self.scale


@pytest.mark.parametrize("make", [lambda s: functools.partial(scaled, s), closure_loss, ModuleLoss],
                         ids=["partial", "closure", "module"])
def test_losses_with_other_settings_have_other_identities(make):
    assert loss_identity(make(1.0)) == loss_identity(make(1.0))
    assert loss_identity(make(1.0)) != loss_identity(make(2.0))


def test_torch_losses_with_other_settings_differ():
    assert loss_identity(nn.CrossEntropyLoss()) == loss_identity(nn.CrossEntropyLoss())
    assert loss_identity(nn.CrossEntropyLoss(label_smoothing=0.1)) != loss_identity(nn.CrossEntropyLoss())
    assert loss_identity(nn.CrossEntropyLoss(reduction="sum")) != loss_identity(nn.CrossEntropyLoss())


def test_a_loss_with_another_setting_is_scored_again(tmp_path):
    key_one, _ = search_key(tmp_path, loss_fn=functools.partial(scaled, 1.0))
    assert search_key(tmp_path, loss_fn=functools.partial(scaled, 1.0)) == (key_one, True)
    key_two, hit = search_key(tmp_path, loss_fn=functools.partial(scaled, 3.0))
    assert key_two != key_one and not hit
    stats_one = autoq.PlanCache(tmp_path).get_stats(key_one)
    stats_two = autoq.PlanCache(tmp_path).get_stats(key_two)
    first_one = stats_one.layers["first"].sensitivity["int4_g32"]
    assert stats_two.layers["first"].sensitivity["int4_g32"] == pytest.approx(9 * first_one, rel=1e-4)


# ---------------------------------------------------------------------------- apply and plans


def test_layers_viewing_one_buffer_keep_their_own_weights():
    """Two layers whose weights are different views of one buffer must not share a quantization."""
    buffer = torch.randn(2, 32, 64)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False))
    for i, layer in enumerate(model):
        layer.weight = nn.Parameter(buffer[i])
    assert model[0].weight.untyped_storage().data_ptr() == model[1].weight.untyped_storage().data_ptr()
    autoq.apply(model, {"0": "int8_weight_only", "1": "int8_weight_only"})
    for i, layer in enumerate(model):
        error = (layer.dequantize() - buffer[i]).norm() / buffer[i].norm()
        assert error < 0.01, i


def test_build_plan_returns_a_finished_plan():
    stats = synthetic_stats()
    groups = solve.group_layers(stats.layers)
    solution = solve.solve(stats.costs(), 8.0, "accuracy", groups)
    plan = autoq.plan.build_plan(stats, solution, budget=8.0, objective="accuracy", group_rules=[],
                                 groups=groups, stage_seconds={"solve": 0.5}, cache_key="k",
                                 stats_key="s")
    assert (plan.cache_key, plan.settings["stats_key"], plan.stage_seconds) == ("k", "s", {"solve": 0.5})
    resolved = autoq.resolve(plan, effective_bits=6.0)
    assert resolved.cache_key and resolved.settings["stats_key"] == "s"


def test_speed_objective_refinement_keeps_the_fastest_latency(monkeypatch):
    """With refinement, "speed" may trade loss only among plans as fast as the integer program's."""
    stats = synthetic_stats()
    groups = solve.group_layers(stats.layers)
    ip = solve.solve(stats.costs(), 8.0, "speed", groups)
    slower = {name: "none" for name in stats.layers}  # no faster, lower measured loss
    front = [solve.ParetoPoint(loss=0.1, effective_bits=8.0, latency=ip.latency_unquantized, assignment=slower),
             solve.ParetoPoint(loss=1.0, effective_bits=8.0, latency=ip.latency, assignment=ip.assignment)]
    assert ip.latency < ip.latency_unquantized
    monkeypatch.setattr(solve, "refine", lambda *a, **k: front)
    monkeypatch.setattr(api.sensitivity, "LossEvaluator",
                        lambda *a, **k: lambda assignment: 1.0 if assignment == ip.assignment else 0.1)

    class Cache:
        def study_storage(self):
            return "sqlite://"

    for objective, expect_fast in [("speed", True), ("balanced", False)]:
        config = SearchConfig(effective_bits=8.0, objective=objective, refine_trials=2)
        chosen, _, _ = api._refine(None, [], [], {}, config, stats, ip, groups, Cache(), "key", None)
        assert (chosen.latency == ip.latency) == expect_fast, objective


# ---------------------------------------------------------------------------- the pipeline


def test_stage_names_are_defined_once():
    from service.jobs import STAGE_WEIGHTS

    assert set(STAGE_WEIGHTS) == set(Stage)
    assert [s.value for s in api.Stage] == [s.value for s in Stage]


def test_pipeline_reports_its_stages_and_writes_the_checkpoint(tmp_path):
    events = []
    result = autoq.quantize("bundled:minilm", stream=False, config=SearchConfig(formats=["int8_weight_only"], effective_bits=9,
                                                           cache_dir=str(tmp_path / "cache")),
                            calibration_texts=["A short sentence.", "Another one, a little longer."],
                            out_dir=tmp_path / "out", on_stage=lambda stage, message: events.append(stage),
                            progress=lambda stage, fraction, message: events.append(stage))
    stages = list(dict.fromkeys(events))
    assert stages == [Stage.LOAD, Stage.CALIBRATION, Stage.PROFILE, Stage.BENCHMARK, Stage.SENSITIVITY,
                      Stage.SOLVE, Stage.APPLY, Stage.EXPORT]
    assert (tmp_path / "out" / "plan.json").is_file()
    loaded = autoq.load_quantized(tmp_path / "out")
    assert autoq.layer_formats(loaded) == autoq.layer_formats(result.model)

    def stop(stage, message):
        if stage == Stage.APPLY:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        autoq.quantize("bundled:minilm", plan=result.plan, out_dir=tmp_path / "never", on_stage=stop)
    assert not (tmp_path / "never").exists()


def test_measured_speed_is_reported_and_a_slower_plan_says_why(tmp_path):
    model = TwoLayers()
    result = autoq.quantize(model, SearchConfig(effective_bits=9.0, formats=["int8_weight_only"],
                                                cache_dir=str(tmp_path)),
                            calibration=batches(), progress=False, measure=True)
    assert set(result.forward_seconds) == {"float", "bf16", "quantized"}
    assert all(t > 0 for t in result.forward_seconds.values())
    assert "measured forward" in result.speed_summary()
    result.forward_seconds = {"float": 1.0, "bf16": 1.5, "quantized": 2.0}
    summary = result.speed_summary()
    assert "0.50x" in summary and "slower than the float one" in summary and "objective='speed'" in summary
    result.forward_seconds = {"float": 2.0, "bf16": 1.5, "quantized": 1.0}
    assert "slower" not in result.speed_summary()
