"""``autoquant`` on small models built from configs and by hand: Llama (model loss, groups,
refinement), GPT-2 (Conv1D, tied head), and formats dropped for shape, accuracy or a raising
kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoq import autoquant, layer_formats, search
from autoq import bench as bench_module

from conftest import tiny_gpt2, tiny_llama


def token_batches(n: int, batch: int = 2, length: int = 16, labels: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, length), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            b["labels"] = ids.clone()
        batches.append(b)
    return batches


def test_tiny_llama_with_labels(tmp_path):
    model = tiny_llama()
    batches = token_batches(3, labels=True)
    with torch.no_grad():
        reference = model(**batches[0]).logits
    model, plan = autoquant(model, batches, effective_bits=7.0, cache_dir=tmp_path, progress=False)
    assert plan.effective_bits <= 7.0
    assert plan.settings["loss"].startswith("the model's own loss")
    assert "lm_head" in plan.layers  # not tied: searched
    for block in range(2):
        prefix = f"model.layers.{block}."
        qkv = {plan.layers[prefix + f"self_attn.{p}"].format for p in ("q_proj", "k_proj", "v_proj")}
        assert len(qkv) == 1
        assert plan.layers[prefix + "mlp.gate_proj"].format == plan.layers[prefix + "mlp.up_proj"].format
    # in_features 128 and 256: every int4 group size fits, nothing is dropped for shape
    assert all("divisible" not in r for layer in plan.layers.values() for r in layer.dropped.values())
    assert layer_formats(model) == {n: f for n, f in plan.assignment().items() if f != "none"}
    with torch.no_grad():
        logits = model(**batches[0]).logits
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.9


def test_tiny_gpt2_conv1d_and_tied_head(tmp_path):
    model = tiny_gpt2()
    plan = search(model, token_batches(2), effective_bits=6.0, cache_dir=tmp_path, progress=False,
                  exclude=[r"\.mlp\.c_proj$"])
    assert "lm_head" not in plan.layers  # tied to the embedding
    assert not any(name.endswith("mlp.c_proj") for name in plan.layers)  # excluded
    assert plan.layers["transformer.h.0.attn.c_attn"].out_features == 384  # Conv1D read as [out, in]
    assert plan.settings["loss"].startswith("random output probes")
    assert plan.effective_bits <= 6.0
    scores = [layer.sensitivity[f] for layer in plan.layers.values() for f in layer.sensitivity if f != "none"]
    assert all(s > 0 for s in scores)


class TwoLayers(nn.Module):
    def __init__(self, k: int = 96):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(k, 128)
        self.second = nn.Linear(128, 64)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_formats_that_cannot_hold_the_shape_are_dropped(tmp_path):
    model = TwoLayers(k=96)
    plan = search(model, torch.randn(4, 8, 96), effective_bits=8.0, cache_dir=tmp_path, progress=False)
    dropped = plan.layers["first"].dropped
    assert "int4_sym_g128" in dropped and "int4_sym_g64" in dropped
    assert "not divisible by group size 128" in dropped["int4_sym_g128"]
    assert "int4_sym_g32" not in dropped  # 96 = 3 x 32
    assert "int4_sym_g128" not in plan.layers["second"].dropped
    assert plan.layers["first"].format not in dropped
    assert "int4_sym_g128" not in plan.layers["first"].sensitivity


def test_inaccurate_and_raising_formats_are_dropped_not_fatal(tmp_path, monkeypatch):
    model = TwoLayers(k=64)
    with torch.no_grad():
        model.first.weight[:, 0] = 0.0  # the outlier channel carries no signal...
    x = torch.randn(4, 8, 64)
    x[..., 0] = 1e4  # ...but sets every token's int8 scale: the rest rounds to zero

    real = bench_module.quantized_copy

    def flaky(module, fmt, name="", memo=None):
        if fmt == "int4_sym_g64":
            raise RuntimeError("kernel exploded")
        return real(module, fmt, name, memo)

    monkeypatch.setattr(bench_module, "quantized_copy", flaky)
    plan = search(model, [x], effective_bits=9.0, cache_dir=tmp_path, progress=False)
    first = plan.layers["first"]
    assert "below the 10 dB floor" in first.dropped["int8_dynamic"]
    assert "int8_weight_only" not in first.dropped
    for layer in plan.layers.values():
        assert "RuntimeError: kernel exploded" in layer.dropped["int4_sym_g64"]
        assert layer.format != "int4_sym_g64" and "int4_sym_g64" not in layer.latency
    assert first.format != "int8_dynamic"


def test_custom_loss_fn(tmp_path):
    model = TwoLayers(k=64)
    calls = []

    def loss_fn(output, batch):
        calls.append(1)
        return output.pow(2).mean()

    plan = search(model, [torch.randn(4, 8, 64) for _ in range(2)], effective_bits=6.0, loss_fn=loss_fn,
                  cache_dir=tmp_path, progress=False)
    assert len(calls) == 2  # one scoring pass per batch
    assert plan.settings["loss"].startswith("loss_fn ")
    assert plan.layers["first"].sensitivity["int4_sym_g32"] > plan.layers["first"].sensitivity["int8_weight_only"] > 0


def test_bad_arguments_fail_before_any_work(tmp_path):
    model = TwoLayers(k=64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="unknown format"):
        search(model, x, formats=["int3"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown objective"):
        search(model, x, objective="fast", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="effective_bits"):
        search(model, x, effective_bits=-2, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="capture group"):
        search(model, x, groups=[r"first|second"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="calibration is empty"):
        search(model, [], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no quantizable layers"):
        search(model, x, exclude=["."], cache_dir=tmp_path, progress=False)
    with pytest.raises(TypeError, match="progress"):
        search(model, x, cache_dir=tmp_path, progress="yes")
    assert not (tmp_path / "plans").exists()


def test_refinement_measures_real_loss_and_stores_a_resumable_study(tmp_path):
    import optuna

    model = tiny_llama(seed=1)
    batches = token_batches(4, labels=True, seed=1)
    stages = []
    plan = search(model, batches, effective_bits=6.0, objective="accuracy", refine_trials=6,
                  cache_dir=tmp_path, progress=lambda stage, f, m: stages.append(stage))
    assert "refine" in stages
    assert plan.pareto and plan.effective_bits <= 6.0
    for point in plan.pareto:
        assert point.loss > 0 and set(point.assignment) == set(plan.layers)
    summaries = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'refine.db'}")
    assert [s.n_trials for s in summaries] == [6]
    assert summaries[0].study_name == f"autoq-{plan.cache_key}"


def test_a_format_failing_while_scoring_is_dropped(tmp_path, monkeypatch):
    from autoq import sensitivity

    real = sensitivity.quantized_copy

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this input")

    def flaky(module, fmt, name="", memo=None):
        return Broken() if fmt == "int8_weight_only" else real(module, fmt, name, memo)

    monkeypatch.setattr(sensitivity, "quantized_copy", flaky)
    plan = search(TwoLayers(k=64), torch.randn(4, 8, 64), effective_bits=9.0, cache_dir=tmp_path, progress=False)
    for layer in plan.layers.values():
        assert "while scoring: no kernel for this input" in layer.dropped["int8_weight_only"]
        assert "int8_weight_only" not in layer.sensitivity and "int8_weight_only" not in layer.bits
        assert layer.format != "int8_weight_only"


def test_scoring_checkpoints_hf_blocks_with_identical_scores(monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    from autoq import sensitivity
    from autoq.swap import quantizable_layers

    model = tiny_llama(seed=2)
    layers = quantizable_layers(model)
    candidates = {n: ["none", "int8_dynamic", "int4_sym_g64"] for n in layers}
    batches = token_batches(2, seed=2)
    plain, _ = sensitivity.score(model, batches, layers, candidates, checkpointing=False)

    real = checkpoint_module.checkpoint
    used = []

    def counting(*args, **kwargs):
        used.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "checkpoint", counting)
    checkpointed, _ = sensitivity.score(model, batches, layers, candidates, checkpointing=True)
    assert used and set(used) == {False}  # every decoder layer, non-reentrant
    for name in layers:
        for fmt in ("int8_dynamic", "int4_sym_g64"):
            assert checkpointed[name][fmt] == pytest.approx(plain[name][fmt], rel=1e-4)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(not getattr(m, "gradient_checkpointing", False) for m in model.modules())
