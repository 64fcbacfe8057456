"""Writes the llm-compressor checkpoints under tests/data/llmcompressor/<scheme>/.

Each is a tiny random-init Llama (hidden 128, 2 layers, vocab 256; fp32, and bf16 for the
``*_BF16`` directories) quantized by llm-compressor's own ``oneshot`` with
``ignore=["lm_head"]`` and saved compressed, with random token ids as calibration data. The
tests (tests/test_llmcompressor_checkpoints.py) only read these directories, so CI needs no
llm-compressor.

Written with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0,
torch 2.13.0+cpu, datasets 5.2.0 (Python 3.11), in a virtualenv of their own, because
llmcompressor 0.14 pins transformers<=5.17 and compressed-tensors 0.19 while the project uses
transformers 5.24 and compressed-tensors 0.20:

    python -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install llmcompressor 'torch==2.13.0'
    /tmp/llmc-venv/bin/python tests/data/llmcompressor/make_checkpoints.py

Schemes: the presets autoq reads (W8A8, W4A16, W4A16_ASYM, FP8_DYNAMIC; W4A16 also by GPTQ
with ``actorder="weight"``, the other ordering llm-compressor 0.14 offers); llm-compressor's
W8A16 preset, which in compressed-tensors 0.19 and 0.20 is int8 in groups of 128 and has no
autoq format; an explicit int8 per-channel weight-only scheme (``W8A16_CHANNEL``: autoq's
int8_weight_only, which autoq exports as its W8A16); and presets autoq refuses (FP8 with a
static activation scale, NVFP4, W4A8, and W8A8 with an FP8 KV cache).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from tokenizers import Tokenizer, models, pre_tokenizers

HERE = Path(__file__).resolve().parent
SEED = 0
CALIBRATION_SAMPLES = 8
SEQUENCE_LENGTH = 32

W8A16_CHANNEL = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    }
}
KV_CACHE_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}

# directory name -> recipe
RECIPES = {
    "W8A8": lambda: QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    "W8A16": lambda: QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
    "W8A16_CHANNEL": lambda: QuantizationModifier(config_groups=W8A16_CHANNEL, ignore=["lm_head"]),
    "W4A16": lambda: GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
    "W4A16_ASYM": lambda: GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
    "W4A16_ACTORDER_WEIGHT": lambda: GPTQModifier(
        targets="Linear", scheme="W4A16", ignore=["lm_head"], actorder="weight"
    ),
    "FP8_DYNAMIC": lambda: QuantizationModifier(
        targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]
    ),
    "FP8": lambda: QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"]),
    "NVFP4": lambda: QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
    "W4A8": lambda: QuantizationModifier(targets="Linear", scheme="W4A8", ignore=["lm_head"]),
    "W8A8_KV_FP8": lambda: QuantizationModifier(
        targets="Linear", scheme="W8A8", ignore=["lm_head"], kv_cache_scheme=KV_CACHE_FP8
    ),
}
# The same recipes on the model in bf16, as most checkpoints are: scales are written in bf16.
BF16 = "_BF16"
RECIPES.update({f"{name}{BF16}": RECIPES[name]
                for name in ("W8A8", "W8A16_CHANNEL", "W4A16", "W4A16_ASYM", "FP8_DYNAMIC")})


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of the 256 words ``t0`` .. ``t255`` (oneshot wants a processor
    when given a dataset; the data set below is already token ids)."""
    vocab = {f"t{i}": i for i in range(256)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2"
    )


def calibration_set() -> Dataset:
    """Random token ids: no hub access is needed (and the model is random anyway)."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 256, (CALIBRATION_SAMPLES, SEQUENCE_LENGTH), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def write(name: str, base: Path) -> Path:
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    dtype = torch.bfloat16 if name.endswith(BF16) else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    oneshot(model=model, tokenizer=tiny_tokenizer(), recipe=RECIPES[name](),
            dataset=calibration_set(), num_calibration_samples=CALIBRATION_SAMPLES,
            max_seq_length=SEQUENCE_LENGTH, output_dir=str(out))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    print(name, json.dumps(qconfig["config_groups"]), qconfig.get("kv_cache_scheme"))
    return out


def main(names: list[str]) -> None:
    base = HERE / "_base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    try:
        for name in names or list(RECIPES):
            write(name, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
