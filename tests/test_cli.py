"""The ``autoq`` command line through typer's CliRunner, on a tiny BERT saved as a local model
directory (with MiniLM's tokenizer)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from autoq.cli import app
from autoq.plan import Plan

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(config).eval().save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(tiny_bert_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    calib = work / "calib.txt"
    calib.write_text("The river froze early this year.\n\nA quiet street at dawn.\nWe met at the station.\n")
    out = work / "out"
    result = runner.invoke(app, ["quantize", str(tiny_bert_dir), "--bits", "8", "--out", str(out), "--calib",
                                 str(calib), "--formats", "int8_dynamic,int4_g128", "--formats", "int8_weight_only",
                                 "--cache-dir", str(work / "cache"), "--quiet"])
    return result, out, work


def test_quantize_writes_checkpoint_and_plan(quantized):
    result, out, _ = quantized
    assert result.exit_code == 0, result.output
    plan = Plan.load(out / "plan.json")
    assert plan.effective_bits <= 8.0 and plan.budget == 8.0
    assert set(plan.formats) == {"none", "int8_dynamic", "int4_g128", "int8_weight_only"}
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "encoder.layer.0.attention.self.query" in result.stdout
    assert "effective bits" in result.stdout and str(out) in result.stdout


def test_quantized_checkpoint_loads(quantized):
    from autoq import layer_formats, load_quantized

    _, out, _ = quantized
    plan = Plan.load(out / "plan.json")
    model = load_quantized(out)
    assert layer_formats(model) == {n: f for n, f in plan.assignment().items() if f != "none"}


def test_quantize_with_an_existing_plan(quantized, tiny_bert_dir):
    _, out, work = quantized
    result = runner.invoke(app, ["quantize", str(tiny_bert_dir), "--out", str(work / "again"), "--plan",
                                 str(out / "plan.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert Plan.load(work / "again" / "plan.json").assignment() == Plan.load(out / "plan.json").assignment()


def test_plan_show_and_resolve(quantized):
    _, out, work = quantized
    shown = runner.invoke(app, ["plan", "show", str(out / "plan.json")])
    assert shown.exit_code == 0 and "encoder.layer.1.output.dense" in shown.stdout
    new = work / "six.json"
    resolved = runner.invoke(app, ["plan", "resolve", str(out / "plan.json"), "--bits", "6", "--out", str(new)])
    assert resolved.exit_code == 0, resolved.output
    plan = Plan.load(new)
    assert plan.budget == 6.0 and plan.effective_bits <= 6.0
    speed = runner.invoke(app, ["plan", "resolve", str(out / "plan.json"), "--bits", "6", "--objective", "speed"])
    assert speed.exit_code == 0 and "objective=speed" in speed.stdout


@pytest.mark.parametrize("args, message", [
    (["quantize", "/nonexistent/model", "--out", "x"], "neither a bundled model"),
    (["quantize", "bundled:nothing", "--out", "x"], "unknown bundled model"),
    (["quantize", "bundled:minilm", "--out", "x", "--objective", "fastest"], "unknown objective"),
    (["quantize", "bundled:minilm", "--out", "x", "--formats", "int3"], "unknown format"),
    (["quantize", "bundled:minilm", "--out", "x", "--calib", "/nonexistent.txt"], "does not exist"),
    (["plan", "show", "/nonexistent/plan.json"], "no plan at"),
])
def test_bad_input_is_a_clear_error(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_infeasible_and_malformed_plans(quantized, tmp_path):
    _, out, _ = quantized
    result = runner.invoke(app, ["plan", "resolve", str(out / "plan.json"), "--bits", "2"])
    assert result.exit_code == 1 and "smallest feasible budget" in result.output and "--bits" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    result = runner.invoke(app, ["plan", "show", str(bad)])
    assert result.exit_code == 1 and "invalid JSON" in result.output and "Traceback" not in result.output


def test_empty_calibration_file(tiny_bert_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    result = runner.invoke(app, ["quantize", str(tiny_bert_dir), "--out", str(tmp_path / "o"), "--calib", str(empty)])
    assert result.exit_code == 1 and "no non-empty lines" in result.output


def test_serve_refuses_a_public_bind_without_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOQ_TOKENS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "no tokens are configured" in (result.output + str(result.exception))
