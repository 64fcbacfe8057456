"""Exports load in a process that never imports autoq (plain transformers + compressed-tensors)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import autoq

from conftest import tiny_llama

DEFAULT_QUANTIZED = [f.name for f in autoq.formats.all_formats() if f.quantized and f.default_candidate]
WEIGHT_ONLY_DEFAULTS = [f for f in DEFAULT_QUANTIZED if "dynamic" not in f] + ["none"]

LOAD_WITHOUT_AUTOQ = textwrap.dedent("""
    import sys, torch, transformers
    path, kind, inputs, out = sys.argv[1:5]
    model_cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    model = model_cls.from_pretrained(path).eval()
    batch = torch.load(inputs)
    with torch.no_grad():
        result = model(**batch)
    tensor = result.logits if kind == "causal" else result.last_hidden_state
    assert "autoq" not in sys.modules, "autoq was imported"
    torch.save(tensor, out)
""")


def load_without_autoq(tmp_path, checkpoint, kind: str, batch: dict) -> torch.Tensor:
    torch.save(batch, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_AUTOQ)
    result = subprocess.run([sys.executable, str(script), str(checkpoint), kind, str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def reference(model, monkeypatch, **batch):
    monkeypatch.setenv("AUTOQ_BACKEND", "reference")
    with torch.no_grad():
        out = model(**batch)
    monkeypatch.delenv("AUTOQ_BACKEND")
    return out


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cycled(names, choices):
    return {name: choices[i % len(choices)] for i, name in enumerate(names)}


def test_default_formats_leave_out_asymmetric_int4():
    assert "int4_sym_g128" in DEFAULT_QUANTIZED and "int4_g128" not in DEFAULT_QUANTIZED
    assert "int4_g128" not in autoq.SearchConfig().formats
    assert "int4_g128" in autoq.SearchConfig(formats=["int4_g128"]).formats  # opt-in


def test_llama_export_with_every_default_weight_only_format_loads_without_autoq(tmp_path, monkeypatch):
    model = tiny_llama()
    layers = list(autoq.quantizable_layers(model))
    plan = cycled(layers, WEIGHT_ONLY_DEFAULTS)
    for block in range(2):  # vLLM fuses q/k/v and gate/up: give siblings one format
        prefix = f"model.layers.{block}."
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for leaf in group[1:]:
                plan[prefix + leaf] = plan[prefix + group[0]]
    autoq.apply(model, plan)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference(model, monkeypatch, input_ids=ids).logits
    autoq.save_quantized(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    logits = load_without_autoq(tmp_path, tmp_path / "ckpt", "causal", {"input_ids": ids})
    assert rel_err(logits, expected) <= 1e-3


def test_int8_groups_export_is_llmcompressors_w8a16_and_loads_without_autoq(tmp_path, monkeypatch):
    """int8_g128 exports compressed-tensors' W8A16 preset (int8 symmetric, groups of 128), which
    plain transformers loads to the weights autoq computes with."""
    from autoq.checkpoint.compressed_tensors import preset_names

    model = tiny_llama()
    autoq.apply(model, {name: "int8_g128" for name in autoq.quantizable_layers(model)})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference(model, monkeypatch, input_ids=ids).logits
    autoq.save_quantized(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    [group] = config["config_groups"].values()
    assert group["format"] == "pack-quantized" and "W8A16" in preset_names(group)
    logits = load_without_autoq(tmp_path, tmp_path / "ckpt", "causal", {"input_ids": ids})
    assert rel_err(logits, expected) <= 1e-5


@pytest.mark.parametrize("choices, bound", [(WEIGHT_ONLY_DEFAULTS, 1e-3), (DEFAULT_QUANTIZED, 3e-2)],
                         ids=["weight-only", "all-defaults"])
def test_minilm_export_with_default_formats_loads_without_autoq(choices, bound, minilm, minilm_tokenizer,
                                                                unseen_batch, tmp_path, monkeypatch):
    names = list(autoq.quantizable_layers(minilm))
    plan = {}
    for i, name in enumerate(names):  # q/k/v of one block share a format
        if ".attention.self." in name:
            block = int(name.split("encoder.layer.")[1].split(".")[0])
            plan[name] = choices[block % len(choices)]
        else:
            plan[name] = choices[i % len(choices)]
    assert set(plan.values()) == set(choices)
    autoq.apply(minilm, plan)
    expected = reference(minilm, monkeypatch, **unseen_batch).last_hidden_state
    autoq.save_quantized(minilm, tmp_path / "ckpt", tokenizer=minilm_tokenizer)
    hidden = load_without_autoq(tmp_path, tmp_path / "ckpt", "encoder", unseen_batch)
    # Weight-only layers dequantize to the same weights; dynamic-activation layers round
    # activations differently in compressed-tensors' forward (int8: absmax / 127.5).
    err = rel_err(hidden, expected)
    print(f"relative error {err:.2e}")
    assert err <= bound


def test_asymmetric_int4_export_warns_and_names_the_symmetric_format(tmp_path):
    from autoq import compat

    model = tiny_llama()
    autoq.apply(model, {name: "int4_g64" for name in autoq.quantizable_layers(model)})
    if compat.plain_transformers_loads_asymmetric_int4():
        pytest.skip("the installed compressed-tensors loads asymmetric int4 without autoq")
    with pytest.warns(UserWarning, match=r"int4_g64.*cannot load it in transformers.*int4_sym_g64"):
        autoq.save_quantized(model, tmp_path / "ckpt")
