"""compressed-tensors checkpoints: export, import, and interop with transformers and the
compressed-tensors library itself."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from torch import nn

import autoq
from autoq.checkpoint import compressed_tensors as ct_ckpt

from conftest import tiny_gpt2, tiny_llama

WEIGHT_ONLY = ["int8_weight_only", "int4_g32", "int4_g64", "int4_g128", "none"]


class Plan:
    """Stand-in for autoq's Plan: what apply() and the writers use of it."""

    def __init__(self, assignment: dict[str, str]):
        self._assignment = assignment

    def assignment(self) -> dict[str, str]:
        return dict(self._assignment)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"assignment": self._assignment}))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference_output(model, monkeypatch, *args, **kwargs):
    """autoq's numbers: the reference backend (exact fp32 dequantization, as transformers does)."""
    monkeypatch.setenv("AUTOQ_BACKEND", "reference")
    with torch.no_grad():
        out = model(*args, **kwargs)
    monkeypatch.delenv("AUTOQ_BACKEND")
    return out


def cycle_plan(model, choices: list[str]) -> dict[str, str]:
    """Formats by layer role and depth; fused siblings (q/k/v, gate/up) share one format."""
    roles = {
        "q_proj": 0,
        "k_proj": 0,
        "v_proj": 0,
        "o_proj": 1,
        "gate_proj": 2,
        "up_proj": 2,
        "down_proj": 3,
        "query": 0,
        "key": 0,
        "value": 0,
    }
    plan = {}
    for i, name in enumerate(autoq.quantizable_layers(model)):
        depth = next((int(p) for p in name.split(".") if p.isdigit()), 0)
        role = roles.get(name.rsplit(".", 1)[-1], i)
        plan[name] = choices[(depth * 5 + role) % len(choices)]
    return plan


def minilm_plan(model) -> dict[str, str]:
    """Every format, spread over depth and role; q/k/v share one per layer."""
    choices = autoq.formats.names()
    plan = {}
    for name in autoq.quantizable_layers(model):
        depth = next((int(p) for p in name.split(".") if p.isdigit()), 0)
        role = (
            0
            if ".attention.self." in name
            else 1
            if ".attention.output." in name
            else 2
            if ".intermediate." in name
            else 3
            if name.endswith("output.dense")
            else 4
        )
        plan[name] = choices[(depth * 5 + role) % len(choices)]
    return plan


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 37])
def test_pack_int32_matches_compressed_tensors(num_bits, cols):
    torch.manual_seed(0)
    signed = torch.randint(
        -(1 << (num_bits - 1)), 1 << (num_bits - 1), (24, cols), dtype=torch.int8
    )
    unsigned = (signed.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    ours = ct_ckpt.pack_int32(unsigned, num_bits)
    assert torch.equal(ours, pack_to_int32(signed, num_bits))
    assert torch.equal(
        ct_ckpt.pack_int32(unsigned.t(), num_bits).t(),
        pack_to_int32(signed, num_bits, packed_dim=0),
    )
    assert torch.equal(ct_ckpt.unpack_int32(ours, num_bits, cols), unsigned)


@pytest.mark.parametrize("format_name", [f for f in autoq.formats.names() if f != "none"])
def test_layer_tensors_equal_compressed_tensors_compressor(format_name):
    """Our export of a layer is exactly what compressed-tensors' compressor writes for it, and its
    decompressor gives back autoq's dequantized weight."""
    torch.manual_seed(1)
    layer = autoq.modules.quantize_layer(torch.randn(48, 256), None, format_name)
    ours = ct_ckpt.export_layer(layer, torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], **ct_ckpt.scheme_for(format_name))
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": ours["weight_scale"]}
    if hasattr(layer, "zero_point"):
        state["weight_zero_point"] = (
            layer.zero_point.to(torch.int8) - 8
        )  # signed, as in its forward
    theirs = compressor.compress(state, scheme)
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    decompressed = compressor.decompress(ours, scheme)["weight"]
    assert torch.equal(decompressed, layer.dequantize(torch.float32))


def test_scheme_per_format_and_config_groups():
    model = tiny_llama()
    plan = cycle_plan(model, ["int8_dynamic", "int4_g64", "none", "int8_weight_only"])
    autoq.apply(model, plan)
    qconfig = ct_ckpt.quantization_config(model)
    assert qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["format"] == "mixed-precision"
    assert "lm_head" in plan  # the plan covers every quantizable layer
    assert qconfig["ignore"] == [n for n, f in plan.items() if f == "none"]
    for format_name, group in qconfig["config_groups"].items():
        assert group["targets"] == [n for n, f in plan.items() if f == format_name]
        validated = QuantizationScheme.model_validate(group)  # a valid compressed-tensors scheme
        assert ct_ckpt.format_for_scheme(format_name, validated.model_dump()) == format_name
    assert qconfig["config_groups"]["int8_dynamic"]["format"] == "int-quantized"
    assert qconfig["config_groups"]["int4_g64"]["weights"]["symmetric"] is False
    QuantizationConfig.model_validate(qconfig)


# --------------------------------------------------------------------------- round trips


def test_llama_weight_only_round_trip(tmp_path, monkeypatch):
    model = tiny_llama()
    plan = Plan(cycle_plan(model, WEIGHT_ONLY))
    autoq.apply(model, plan)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference_output(model, monkeypatch, ids).logits
    with torch.no_grad():
        fast = model(ids).logits

    autoq.save_quantized(model, tmp_path, plan=plan)
    assert not (tmp_path / "autoq.json").exists()
    assert json.loads((tmp_path / "plan.json").read_text())["assignment"] == plan.assignment()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = rel_err(hf(ids).logits, expected)
    assert err <= 1e-3, err

    loaded = autoq.load_quantized(tmp_path)
    assert autoq.layer_formats(loaded) == autoq.layer_formats(model)
    assert all(
        isinstance(loaded.get_submodule(n), nn.Linear)
        for n, f in plan.assignment().items()
        if f == "none"
    )
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fast)


@pytest.mark.parametrize("format_name", ["fp8_e4m3_weight_only", "fp8_e4m3_dynamic"])
def test_llama_fp8_round_trip(format_name, tmp_path, monkeypatch):
    """FP8 exports are float-quantized checkpoints that plain transformers loads."""
    model = tiny_llama()
    plan = Plan({name: format_name for name in autoq.quantizable_layers(model)})
    autoq.apply(model, plan)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = reference_output(model, monkeypatch, ids).logits
    with torch.no_grad():
        fast = model(ids).logits
    autoq.save_quantized(model, tmp_path, plan=plan)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "float-quantized"
    group = next(iter(qconfig["config_groups"].values()))
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert (group["input_activations"] is None) == (format_name == "fp8_e4m3_weight_only")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = rel_err(hf(ids).logits, expected)
    assert err <= 2e-2, err
    loaded = autoq.load_quantized(tmp_path)
    assert set(autoq.layer_formats(loaded).values()) == {format_name}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fast)


def test_minilm_every_format_round_trip(
    minilm, minilm_tokenizer, unseen_batch, tmp_path, monkeypatch
):
    plan = minilm_plan(minilm)
    assert set(plan.values()) == set(autoq.formats.names())
    autoq.apply(minilm, plan)
    expected = reference_output(minilm, monkeypatch, **unseen_batch).last_hidden_state
    with torch.no_grad():
        fast = minilm(**unseen_batch).last_hidden_state

    autoq.save_quantized(minilm, tmp_path, tokenizer=minilm_tokenizer)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"]
        == "mixed-precision"
    )

    hf = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = rel_err(hf(**unseen_batch).last_hidden_state, expected)
    assert err <= 2e-2, err  # int8_dynamic: compressed-tensors rounds activations with absmax/127.5
    for name, layer in autoq.swap.quantized_layers(minilm).items():  # decompressed on first forward
        assert torch.equal(hf.get_submodule(name).weight, layer.dequantize()), name

    loaded = autoq.load_quantized(tmp_path)
    assert autoq.layer_formats(loaded) == autoq.layer_formats(minilm)
    with torch.no_grad():
        assert torch.equal(loaded(**unseen_batch).last_hidden_state, fast)


def test_tied_head_is_left_out_and_retied(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    autoq.apply(model, cycle_plan(model, ["int8_dynamic", "int4_g32"]))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    autoq.save_quantized(model, tmp_path)
    assert (
        "lm_head"
        in json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    )
    loaded = autoq.load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_sharded_checkpoint(tmp_path, monkeypatch):
    model = tiny_llama()
    autoq.apply(model, cycle_plan(model, ["int8_dynamic", "int4_g32", "int8_weight_only"]))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    max_shard_size = 40_000
    autoq.save_quantized(model, tmp_path, max_shard_size=max_shard_size)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    from safetensors import safe_open

    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
        assert all(index["weight_map"][k] == shard.name for k in keys)
        # Header aside, a shard stays under the limit unless it is one oversized tensor.
        assert shard.stat().st_size <= max_shard_size + 4096 or len(keys) == 1
    loaded = autoq.load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reference = reference_output(model, monkeypatch, ids).logits
    with torch.no_grad():
        assert rel_err(hf(ids).logits, reference) <= 2e-2


def test_weight_bytes_match_storage_bits(tmp_path):
    """Weights cost exactly their bits; only the scale/zero-point encoding differs from autoq's."""
    model = tiny_llama()
    autoq.apply(model, cycle_plan(model, [f for f in autoq.formats.names() if f != "none"]))
    autoq.save_quantized(model, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    for name, layer in autoq.swap.quantized_layers(model).items():
        fmt, n, k = layer.format, layer.out_features, layer.in_features
        payload = tensors.get(f"{name}.weight", tensors.get(f"{name}.weight_packed"))
        assert payload.numel() * payload.element_size() * 8 == n * k * fmt.weight_bits
        extras = [
            tensors[f"{name}.{s}"]
            for s in ("weight_scale", "weight_zero_point")
            if f"{name}.{s}" in tensors
        ]
        ct_bytes = payload.numel() * payload.element_size() + sum(
            t.numel() * t.element_size() for t in extras
        )
        autoq_bytes = fmt.storage_bits(n, k) * n * k / 8
        autoq_overhead = autoq_bytes - n * k * fmt.weight_bits / 8
        assert abs(ct_bytes - autoq_bytes) <= autoq_overhead, (name, ct_bytes, autoq_bytes)


# --------------------------------------------------------------------------- foreign checkpoints


def ct_quantized_llama(groups: dict[str, dict]) -> nn.Module:
    """A tiny Llama quantized by compressed-tensors itself (min/max qparams), in fake-quant mode."""
    model = tiny_llama(seed=3)
    schemes = {g: QuantizationScheme(**s) for g, s in groups.items()}
    apply_quantization_config(model, QuantizationConfig(config_groups=schemes, ignore=["lm_head"]))
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args, w = scheme.weights, module.weight.detach()
        if args.strategy == "group":
            w = w.unflatten(-1, (-1, args.group_size))
            lo, hi = w.amin(-1), w.amax(-1)
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale, zero_point = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point)
        module.quantization_status = QuantizationStatus.FROZEN
    return model.eval()


CT_GROUPS = {
    "attn_w8a8": {
        "targets": [r"re:.*self_attn\.(q|k|v)_proj$"],
        "weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
        "input_activations": {
            "num_bits": 8,
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        },
    },
    "out_w8a16": {
        "targets": [r"re:.*o_proj$"],
        "weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
    },
    "mlp_w4a16_asym": {
        "targets": [r"re:.*mlp\.(gate|up)_proj$"],
        "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
    },
    "down_w4a16": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 64},
    },
}


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory):
    model = ct_quantized_llama(CT_GROUPS)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake_quant = model(ids).logits
    fake_weights = {
        name: fake_quantize(
            m.weight,
            m.weight_scale,
            getattr(m, "weight_zero_point", None),
            m.quantization_scheme.weights,
        )
        for name, m in model.named_modules()
        if hasattr(m, "quantization_scheme")
    }
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    path = tmp_path_factory.mktemp("ct_written")
    model.save_pretrained(path)
    compressor.update_config(path)
    return path, ids, fake_quant, fake_weights


def test_loads_checkpoint_written_by_compressed_tensors(ct_checkpoint, monkeypatch):
    path, ids, fake_quant, fake_weights = ct_checkpoint
    assert (
        json.loads((path / "config.json").read_text())["quantization_config"]["format"]
        == "mixed-precision"
    )
    loaded = autoq.load_quantized(path)
    expected_formats = {
        "q_proj": "int8_dynamic",
        "k_proj": "int8_dynamic",
        "v_proj": "int8_dynamic",
        "o_proj": "int8_weight_only",
        "gate_proj": "int4_g32",
        "up_proj": "int4_g32",
        "down_proj": "int4_sym_g64",  # a symmetric scheme: autoq's symmetric format
    }
    formats = autoq.layer_formats(loaded)
    assert formats == {n: expected_formats[n.rsplit(".", 1)[-1]] for n in fake_weights}
    assert isinstance(loaded.lm_head, nn.Linear)
    for name, weight in fake_weights.items():
        # int4 scales become fp16 in autoq's layout: the one lossy step.
        assert rel_err(loaded.get_submodule(name).dequantize(), weight) <= 1e-3, name
    err = rel_err(reference_output(loaded, monkeypatch, ids).logits, fake_quant)
    assert err <= 2e-2, err


def test_unsupported_schemes_are_named(ct_checkpoint, tmp_path):
    path, *_ = ct_checkpoint
    config = json.loads((path / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    down = next(name for name, group in groups.items() if group["targets"] == ["Linear"])
    groups[down]["weights"]["group_size"] = 16
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"'{down}'.*int4 symmetric group size 16.*no autoq format"
    ):
        autoq.load_quantized(tmp_path)

    static_fp8 = {  # compressed-tensors' FP8 preset: a calibrated per-tensor activation scale
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    }
    with pytest.raises(ValueError, match=r"'fp8'.*float8 symmetric tensor.*no autoq format"):
        ct_ckpt.format_for_scheme("fp8", static_fp8)


# --------------------------------------------------------------------------- fallbacks


def test_gpt2_conv1d_falls_back_to_autoq_format(tmp_path):
    model = tiny_gpt2()
    autoq.apply(model, cycle_plan(model, ["int8_dynamic", "int4_g32"]))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert autoq.checkpoint.default_format(model) == "autoq"
    with pytest.warns(UserWarning, match=r"Conv1D, not an nn.Linear"):
        autoq.save_quantized(model, tmp_path / "default")
    with pytest.warns(UserWarning, match=r"Conv1D, not an nn.Linear"):
        autoq.save_quantized(model, tmp_path / "explicit", format="compressed-tensors")
    for path in (tmp_path / "default", tmp_path / "explicit"):
        assert (path / "autoq.json").is_file()
        assert "quantization_config" not in json.loads((path / "config.json").read_text())
        with torch.no_grad():
            assert torch.equal(autoq.load_quantized(path)(ids).logits, expected)


def test_format_autoq_forces_own_format_and_plain_models_default_to_it(tmp_path, recwarn):
    model = tiny_llama()
    autoq.apply(model, cycle_plan(model, ["int4_g32"]))
    assert autoq.checkpoint.default_format(model) == "compressed-tensors"
    autoq.save_quantized(model, tmp_path / "own", format="autoq")
    assert (tmp_path / "own" / "autoq.json").is_file()

    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    autoq.apply(plain, {"0": "int8_dynamic"})
    assert autoq.checkpoint.default_format(plain) == "autoq"
    autoq.save_quantized(plain, tmp_path / "plain")
    assert (tmp_path / "plain" / "autoq.json").is_file()
    assert not [w for w in recwarn if "compressed-tensors" in str(w.message)]


def test_plan_that_splits_fused_layers_warns(tmp_path):
    model = tiny_llama()
    plan = cycle_plan(model, ["int4_g32"])
    plan["model.layers.0.self_attn.k_proj"] = "int8_weight_only"
    autoq.apply(model, plan)
    with pytest.warns(UserWarning, match=r"k_proj=int8_weight_only.*vLLM fuses"):
        autoq.save_quantized(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]


def test_compat_patch_is_installed_for_transformers_loading():
    """autoq.compat packs meta zero points so plain from_pretrained loads asymmetric int4."""
    assert getattr(PackedQuantizationCompressor, "_autoq_packs_meta_zero_point", False)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights={"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    )
    meta = {"weight": torch.empty(64, 128, device="meta"),
            "weight_scale": torch.empty(64, 4, device="meta"),
            "weight_zero_point": torch.empty(64, 4, dtype=torch.int8, device="meta")}
    out = PackedQuantizationCompressor.compress(meta, scheme)
    assert out["weight_zero_point"].shape == (math.ceil(64 * 4 / 32), 4)
    assert out["weight_zero_point"].dtype == torch.int32
