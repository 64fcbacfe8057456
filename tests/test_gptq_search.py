"""GPTQ as a quantization method: scored by the search, recorded in the plan, reproduced by apply
and exported (the algorithm itself is tested in test_gptq.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import autoq
from autoq.calibration import bundled_texts, text_batches
from autoq.config import SearchConfig

from conftest import embedding_cosine, mean_pooled, tiny_llama


@pytest.fixture(scope="module")
def minilm_calibration(minilm_tokenizer):
    return text_batches(bundled_texts(), minilm_tokenizer)


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir, unseen_batch):
    return mean_pooled(transformers.AutoModel.from_pretrained(minilm_dir).eval(), unseen_batch)


# The bars for GPTQ on MiniLM's held-out sentences (round to nearest in brackets):
# int4_g128 0.975 (0.963), int4_g32 0.983 (0.977); FP8 weight-only reaches int8's 0.999 only so.
GPTQ_MIN_COSINE = {"int4_g128": 0.975, "int4_g32": 0.983, "fp8_e4m3_weight_only": 0.999}


@pytest.mark.parametrize("fmt", list(GPTQ_MIN_COSINE))
def test_uniform_gptq_on_minilm(fmt, minilm, minilm_calibration, unseen_batch, minilm_reference):
    layers = autoq.quantizable_layers(minilm)
    autoq.apply(minilm, {name: fmt for name in layers}, method="gptq", calibration=minilm_calibration)
    cosine = embedding_cosine(mean_pooled(minilm, unseen_batch), minilm_reference)
    assert cosine >= GPTQ_MIN_COSINE[fmt], f"{fmt}: cosine {cosine:.4f}"


def token_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def gptq_search(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gptq-cache")
    model = tiny_llama(seed=2)
    config = SearchConfig(effective_bits=6.0, method="gptq", cache_dir=str(cache),
                          formats=["int8_weight_only", "int4_sym_g32", "int4_sym_g64"])
    plan = autoq.search(model, token_batches(3), config, progress=False)
    return model, config, plan


def test_the_plan_records_gptq_per_layer(gptq_search):
    _, config, plan = gptq_search
    assert plan.settings["method"] == "gptq"
    quantized = {n: layer for n, layer in plan.layers.items() if layer.format != "none"}
    assert quantized and all(layer.method == "gptq" for layer in quantized.values())
    assert all(layer.methods.get(f) == "gptq" for layer in plan.layers.values() for f in layer.sensitivity
               if f != "none")


def test_apply_needs_the_calibration_and_reproduces_the_weights(gptq_search, tmp_path):
    model, config, plan = gptq_search
    with pytest.raises(ValueError, match="GPTQ.*pass calibration="):
        autoq.apply(tiny_llama(seed=2), plan)
    first = autoq.apply(tiny_llama(seed=2), plan, calibration=token_batches(3))
    again, again_plan = autoq.autoquant(tiny_llama(seed=2), token_batches(3), config, progress=False)
    assert again_plan.from_cache
    for name, layer in autoq.swap.quantized_layers(first).items():
        other = again.get_submodule(name)
        assert torch.equal(layer.qweight, other.qweight) and torch.equal(layer.scale, other.scale), name
        rtn = autoq.formats.get(layer.format_name).quantize(tiny_llama(seed=2).get_submodule(name).weight)
        assert not torch.equal(layer.qweight, rtn.qweight), f"{name} was rounded to nearest"

    ids = token_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = first(ids).logits
    autoq.save_quantized(first, tmp_path / "ckpt", plan=plan)
    loaded = autoq.load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        err = float((hf(ids).logits - expected).norm() / expected.norm())
    assert err < 2e-2  # autoq's native weight-only kernels compute in bf16


def test_method_is_part_of_the_statistics_key(gptq_search):
    model, config, plan = gptq_search
    rtn = autoq.search(model, token_batches(3), config, method="rtn", progress=False)
    assert rtn.settings["stats_key"] != plan.settings["stats_key"] and not rtn.from_cache
    assert all(layer.method == "rtn" for layer in rtn.layers.values())


def test_auto_takes_the_lower_score_per_layer_and_format(gptq_search):
    model, config, plan = gptq_search
    rtn = autoq.search(model, token_batches(3), config, method="rtn", progress=False)
    auto = autoq.search(model, token_batches(3), config, method="auto", progress=False)
    for name, layer in auto.layers.items():
        for fmt, score in layer.sensitivity.items():
            if fmt == "none":
                continue
            expected = min(rtn.layers[name].sensitivity[fmt], plan.layers[name].sensitivity[fmt])
            assert score == pytest.approx(expected, rel=1e-5), (name, fmt)
            lower = "gptq" if plan.layers[name].sensitivity[fmt] < rtn.layers[name].sensitivity[fmt] else "rtn"
            assert layer.methods.get(fmt, "rtn") == lower


class WithDeadLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        return self.used(x)


def test_a_layer_without_a_hessian_falls_back_to_round_to_nearest(tmp_path):
    plan = autoq.search(WithDeadLayer(), [torch.randn(4, 64)], effective_bits=9.0, method="gptq",
                        formats=["int8_weight_only"], cache_dir=str(tmp_path), progress=False)
    assert plan.layers["used"].methods == {"int8_weight_only": "gptq"}
    assert plan.layers["unused"].methods == {}
    assert any("unused: GPTQ fell back to round-to-nearest" in note for note in plan.notes)


def test_a_mapping_with_gptq_needs_calibration():
    model = WithDeadLayer()
    with pytest.raises(ValueError, match="method='gptq'.*calibration"):
        autoq.apply(model, {"used": "int8_weight_only"}, method="gptq")
    with pytest.raises(ValueError, match="unknown method"):
        autoq.apply(model, {"used": "int8_weight_only"}, method="awq")
    with pytest.raises(ValueError, match="unknown method"):
        SearchConfig(method="awq")
