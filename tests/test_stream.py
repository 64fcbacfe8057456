"""Streamed models (autoq.stream): search, apply and export a checkpoint directory block by block.

The streamed stages compute what the in-memory ones do (same probes, same first-order score), so
they are checked against them on models small enough for both, and the exports against
transformers and ``load_quantized``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from test_portable_exports import load_without_autoq, reference, rel_err

import autoq
from autoq import stream
from autoq.pipeline import quantize

from conftest import tiny_gpt2

FORMATS = ["int8_dynamic", "int8_weight_only", "int4_sym_g32", "int4_sym_g64", "int4_sym_g128"]


def llama_dir(tmp_path: Path, layers: int = 3, tie: bool = False, dtype=torch.float32, shard: str | None = None) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    path = tmp_path / f"llama-{layers}-{tie}-{str(dtype)[6:]}"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def batches(n: int = 3, vocab: int = 512, labels: bool = False) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        out.append({"input_ids": ids, **({"labels": ids} if labels else {})})
    return out


def both(path: Path, tmp_path: Path, calibration, **settings):
    """The streamed and the in-memory plan of one checkpoint, sharing one timing table."""
    import transformers

    cache = tmp_path / "cache"
    streamed = autoq.search(path, calibration, cache_dir=cache, progress=False, formats=FORMATS, **settings)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    in_memory = autoq.search(model, calibration, cache_dir=cache, progress=False, formats=FORMATS, **settings)
    return streamed, in_memory


def assert_same_scores(streamed, in_memory, rel: float = 1e-4):
    a, b = streamed.stats(), in_memory.stats()
    assert set(a.layers) == set(b.layers)
    for name, layer in b.layers.items():
        ours = a.layers[name]
        assert set(ours.sensitivity) == set(layer.sensitivity), name
        assert ours.dropped.keys() == layer.dropped.keys(), name
        assert ours.shapes == layer.shapes, name
        for fmt, value in layer.sensitivity.items():
            assert ours.sensitivity[fmt] == pytest.approx(value, rel=rel, abs=1e-12), (name, fmt)
    xs = [b.layers[n].sensitivity["int4_sym_g128"] for n in b.layers]
    ys = [a.layers[n].sensitivity["int4_sym_g128"] for n in b.layers]
    assert spearmanr(xs, ys).statistic >= 0.99


@pytest.mark.parametrize("labels", [False, True], ids=["probes", "loss"])
def test_streamed_search_matches_in_memory(tmp_path, labels):
    path = llama_dir(tmp_path)
    calibration = batches(labels=labels)
    for bits in (5, 6):
        streamed, in_memory = both(path, tmp_path, calibration, effective_bits=bits)
        assert_same_scores(streamed, in_memory)
        assert streamed.assignment() == in_memory.assignment(), bits
        assert streamed.settings["mode"] == "streamed" and in_memory.settings["mode"] == "in memory"
    note = next(n for n in streamed.notes if n.startswith("streamed from"))
    assert "3 blocks" in note and "peak RSS" in note


def test_spilled_activations_give_the_same_scores(tmp_path):
    """max_memory=0: every hidden state and gradient goes through files, with the same result."""
    path = llama_dir(tmp_path)
    spill = tmp_path / "spill"
    kept = autoq.search(path, batches(), cache_dir=tmp_path / "a", progress=False, formats=FORMATS)
    spilled = autoq.search(path, batches(), cache_dir=tmp_path / "b", progress=False, formats=FORMATS,
                           max_memory=0, spill_dir=str(spill))
    assert spilled.settings["spilled_bytes"] > 0 and kept.settings["spilled_bytes"] == 0
    assert "spilled to disk" in next(n for n in spilled.notes if n.startswith("streamed"))
    for name, layer in kept.stats().layers.items():
        assert spilled.stats().layers[name].sensitivity == pytest.approx(layer.sensitivity, rel=1e-6)
    assert not any(spill.rglob("*.safetensors"))  # the spill files are gone


def test_tied_and_sharded_bf16_checkpoint(tmp_path):
    """Tied head (left float, never a candidate), bf16 weights, several shards with an index."""
    path = llama_dir(tmp_path, tie=True, dtype=torch.bfloat16, shard="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    plan = autoq.search(path, batches(), cache_dir=tmp_path / "c", progress=False, formats=FORMATS)
    assert "lm_head" not in plan.assignment()
    assert {layer.dtype for layer in plan.stats().layers.values()} == {"bfloat16"}


def test_minilm_streamed_matches_in_memory(tmp_path, minilm_dir, minilm_tokenizer, minilm):
    """An encoder (BERT: embeddings, encoder.layer blocks, a pooler after them)."""
    from autoq.calibration import bundled_texts, text_batches

    calibration = text_batches(bundled_texts()[:16], minilm_tokenizer)
    cache = tmp_path / "cache"
    streamed = autoq.search(minilm_dir, calibration, cache_dir=cache, progress=False, effective_bits=6)
    in_memory = autoq.search(minilm, calibration, cache_dir=cache, progress=False, effective_bits=6)
    a, b = streamed.stats(), in_memory.stats()
    for name, layer in b.layers.items():
        assert a.layers[name].sensitivity == pytest.approx(layer.sensitivity, rel=1e-4, abs=1e-12), name
    assert streamed.assignment() == in_memory.assignment()


def test_streamed_export_loads_in_transformers_and_autoq(tmp_path, monkeypatch):
    path = llama_dir(tmp_path, layers=2)
    plan = autoq.search(path, batches(), cache_dir=tmp_path / "c", progress=False, formats=FORMATS,
                        effective_bits=5.5)
    assert len(set(plan.assignment().values())) > 1  # a mixed plan
    out = tmp_path / "out"
    stream.export(stream.StreamedModel(path), plan.assignment(), out, plan=plan, max_shard_size=300_000)
    assert (out / "model.safetensors.index.json").is_file() and (out / "plan.json").is_file()

    # The same plan applied to the model in memory and saved the usual way: the same tensors.
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    autoq.apply(model, plan)
    autoq.save_quantized(model, tmp_path / "in-memory")
    ours = {k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
    theirs = load_file(tmp_path / "in-memory" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = json.loads((tmp_path / "in-memory" / "config.json").read_text())["quantization_config"]
    assert config == expected

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = reference(model, monkeypatch, input_ids=ids).logits
    loaded = autoq.load_quantized(out)
    assert autoq.layer_formats(loaded) == {n: f for n, f in plan.assignment().items() if f != "none"}
    assert rel_err(reference(loaded, monkeypatch, input_ids=ids).logits, logits) == 0.0
    int8_dynamic = any(f == "int8_dynamic" for f in plan.assignment().values())
    assert rel_err(load_without_autoq(tmp_path, out, "causal", {"input_ids": ids}), logits) <= (
        2e-2 if int8_dynamic else 1e-5)


def test_pipeline_streams_directories_and_loads_when_it_must(tmp_path):
    path = llama_dir(tmp_path, layers=2)
    calibration = batches()
    result = quantize(path, autoq.SearchConfig(formats=FORMATS, cache_dir=str(tmp_path / "c")),
                      calibration=calibration, out_dir=tmp_path / "out", progress=False)
    assert result.model is None and result.plan.settings["mode"] == "streamed"
    assert autoq.layer_formats(autoq.load_quantized(tmp_path / "out"))

    # autoquant(DIR): quantized block by block into memory
    model, plan = autoq.autoquant(path, calibration, formats=FORMATS, cache_dir=str(tmp_path / "c"), progress=False)
    assert plan.from_cache and autoq.layer_formats(model) == {
        n: f for n, f in plan.assignment().items() if f != "none"}
    assert not any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(calibration[0]["input_ids"]).logits).all()

    # GPTQ needs the model in memory: loaded, not streamed, and said so when streaming is forced.
    gptq = autoq.SearchConfig(formats=["int4_sym_g128"], method="gptq", cache_dir=str(tmp_path / "c"))
    assert quantize(path, gptq, calibration=calibration, progress=False).plan.settings["mode"] == "in memory"
    with pytest.raises(ValueError, match="cannot be streamed: GPTQ"):
        quantize(path, gptq, calibration=calibration, progress=False, stream=True)


def test_streamed_search_refuses_what_needs_the_model_in_memory(tmp_path):
    path = llama_dir(tmp_path, layers=1)
    with pytest.raises(ValueError, match="method='gptq' needs the whole model"):
        autoq.search(path, batches(), method="gptq", progress=False, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="refine_trials"):
        autoq.search(path, batches(), refine_trials=4, progress=False, cache_dir=tmp_path / "c")


def test_incomplete_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = llama_dir(tmp_path, layers=1)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight.*up_proj.*random-initialise"):
        stream.StreamedModel(path)


def test_export_refuses_bad_assignments_before_reading_weights(tmp_path):
    path = llama_dir(tmp_path, layers=1, tie=True)
    sm = stream.StreamedModel(path)
    with pytest.raises(ValueError, match="not a quantizable layer"):
        stream.export(sm, {"model.nope": "int8_dynamic"}, tmp_path / "o")
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        stream.export(sm, {"lm_head": "int8_dynamic"}, tmp_path / "o")
    with pytest.raises(ValueError, match="unknown format"):
        stream.export(sm, {"model.layers.0.mlp.up_proj": "int3"}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_gpt2_conv1d_export_is_refused_with_what_to_do(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    sm = stream.StreamedModel(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="Conv1D.*nn.Linear layers only.*save_quantized"):
        stream.export(sm, {"transformer.h.0.mlp.c_fc": "int8_weight_only"}, tmp_path / "o")


def test_streamed_peak_memory_is_about_one_block(tmp_path):
    """A streamed search of a model of 12 blocks of 29 MB holds about one block at a time: the
    process's resident memory (sampled every 2 ms in a fresh process, from after the imports)
    grows by well under the weights' size."""
    import subprocess

    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=4096, num_hidden_layers=12,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path / "deep"
    model.save_pretrained(path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    script = f"""
import os, threading, time, torch, transformers, autoq
from transformers import LlamaForCausalLM
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
base, peak, done = rss(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
ids = [{{"input_ids": torch.randint(0, 256, (1, 16))}}]
autoq.search({str(path)!r}, ids, formats=["int8_weight_only"], effective_bits=9, progress=False,
             cache_dir={str(tmp_path / 'c')!r})
done.append(1)
print(peak[0] - base)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    grown = int(result.stdout.strip().splitlines()[-1])
    assert weights > 300e6
    print(f"peak RSS grew {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights")
    assert grown < 0.35 * weights, (grown, weights)


def test_data_parallel_scoring_on_two_ray_workers_gives_the_same_plan(tmp_path):
    """workers=2 on a local 2-CPU Ray cluster: the calibration batches split between two workers
    that each stream the checkpoint, their scores summed: the one-process scores and plans."""
    import shutil

    ray = pytest.importorskip("ray")
    path = llama_dir(tmp_path)
    calibration = batches(n=5)  # an uneven split: 2 + 3 batches
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = autoq.search(path, calibration, cache_dir=tmp_path / "p", progress=False, formats=FORMATS,
                                workers=2)
    finally:
        if started:
            ray.shutdown()
    shutil.copytree(tmp_path / "p" / "timings", tmp_path / "one" / "timings")  # one latency table
    one = autoq.search(path, calibration, cache_dir=tmp_path / "one", progress=False, formats=FORMATS)
    assert parallel.settings["workers"] == 2 and one.settings["workers"] == 1
    assert "2 Ray workers" in next(n for n in parallel.notes if n.startswith("streamed"))
    # 1e-6, not exact: the LM head's weight-only scores are fp32 products of its inputs (rows, or
    # their Gram matrix once they outnumber its width), which a split of the batches regroups
    assert_same_scores(parallel, one, rel=1e-6)
    assert parallel.assignment() == one.assignment()
    for bits in (5, 6):
        a = autoq.search(path, calibration, cache_dir=tmp_path / "p", progress=False, formats=FORMATS,
                         effective_bits=bits)  # solved again from the cached statistics
        b = autoq.search(path, calibration, cache_dir=tmp_path / "one", progress=False, formats=FORMATS,
                         effective_bits=bits)
        assert a.assignment() == b.assignment(), bits


def test_workers_need_the_model_directory(tmp_path):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="pass the directory"):
        autoq.search(model, batches(vocab=100), cache_dir=tmp_path, progress=False, workers=2)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        autoq.SearchConfig(workers=0)


def test_offloaded_weights_are_refused_in_memory_with_what_to_do(tmp_path):
    """A model whose weights sit on the meta device (accelerate's disk/CPU offload leaves them
    there between forwards) cannot be searched in memory; the error points at streaming."""
    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc.to_empty(device="meta")
    with pytest.raises(ValueError, match="meta device.*pass the model's directory"):
        autoq.search(model, batches(vocab=100), cache_dir=tmp_path, progress=False)
