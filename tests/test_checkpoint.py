import json

import pytest
import torch
from torch import nn

import autoq

from conftest import mean_pooled, tiny_gpt2, tiny_llama

MIXED = ["int8_dynamic", "int8_weight_only", "int4_g32", "int4_g64", "int4_g128", "none"]


def mixed_plan(model):
    return {name: MIXED[i % len(MIXED)] for i, name in enumerate(autoq.quantizable_layers(model))}


def no_pickle(path):
    for f in path.rglob("*"):
        assert f.suffix in {".safetensors", ".json", ".txt", ".model", ""} or f.is_dir(), f


def test_minilm_round_trip_is_bit_identical(minilm, minilm_tokenizer, unseen_batch, tmp_path):
    autoq.apply(minilm, mixed_plan(minilm))
    expected = mean_pooled(minilm, unseen_batch)
    autoq.save_quantized(minilm, tmp_path, tokenizer=minilm_tokenizer, format="autoq")
    no_pickle(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    loaded = autoq.load_quantized(tmp_path)
    assert autoq.layer_formats(loaded) == autoq.layer_formats(minilm)
    assert torch.equal(mean_pooled(loaded, unseen_batch), expected)


def round_trip(model, path):
    """Quantize with a mixed plan, save in autoq's format, load; (loaded, ids, expected logits)."""
    autoq.apply(model, mixed_plan(model))
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    autoq.save_quantized(model, path, format="autoq")
    return autoq.load_quantized(path), ids, expected


@pytest.mark.parametrize("tied", [True, False])
def test_llama_round_trip_with_and_without_tied_head(tied, tmp_path):
    loaded, ids, expected = round_trip(tiny_llama(tie_word_embeddings=tied), tmp_path)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_gpt2_round_trip(tmp_path):
    loaded, ids, expected = round_trip(tiny_gpt2(), tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_load_never_materialises_float_weights_of_quantized_layers(tmp_path, monkeypatch):
    model = tiny_llama()
    autoq.apply(model, {n: "int4_g32" for n in autoq.quantizable_layers(model)})
    autoq.save_quantized(model, tmp_path, format="autoq")
    created = []
    original = nn.Linear.reset_parameters
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: created.append(self.weight.device.type) or original(self))
    autoq.load_quantized(tmp_path)
    assert created and set(created) == {"meta"}


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 8)
        self.register_buffer("offset", torch.arange(8.0), persistent=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.offset


def test_plain_module_needs_a_skeleton(tmp_path):
    model = Plain()
    autoq.apply(model, {"a": "int8_dynamic"})
    x = torch.randn(3, 64)
    expected = model(x)
    autoq.save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "autoq.json").read_text())
    assert meta["layers"]["a"]["format"] == "int8_dynamic"
    with pytest.raises(ValueError, match="pass the model skeleton"):
        autoq.load_quantized(tmp_path)

    def skeleton():
        with torch.device("meta"):
            return Plain()

    loaded = autoq.load_quantized(tmp_path, model=skeleton)
    assert torch.equal(loaded(x), expected)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        autoq.load_quantized(tmp_path / "nope")
    with pytest.raises(ValueError, match="no checkpoint autoq can read"):
        autoq.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        autoq.save_quantized(Plain(), tmp_path / "x", format="gguf")
