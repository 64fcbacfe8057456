"""Triton backend: our own kernels for every quantized format (see ``autoq.kernels``).

Runs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, which is how
the tests exercise the kernels without a GPU). Kernels and weight layouts are described in
``triton_int8.py`` and ``triton_int4.py``; block configurations come from ``tuning.py``.

Paths per format, chosen by measured time per (M bucket, N, K, group size) on the GPU:

- ``int8_dynamic``: fused per-token quantization, then an int8 tensor-core GEMM with a fused
  scale / bias / cast epilogue (split-K for small M).
- ``int8_weight_only`` and ``int4``: a split-K GEMV (M <= 4), a ``tl.dot`` GEMM with in-kernel
  dequantization (split-K for small M), or dequantize + cuBLAS.
  Rule: for M >= 17 the tuner also times dequantize-into-the-activation-dtype + cuBLAS and uses
  it where it is faster (large, compute-bound M, where cuBLAS' matmul beats ours by more than
  the one extra pass over the weight costs).
"""

from __future__ import annotations

import torch
import triton
import triton.testing

from autoq.kernels import QuantizedWeight, tuning
from autoq.kernels.triton_common import interpreting
from autoq.kernels.triton_int4 import Int4Weight, int4_linear, prepare_int4
from autoq.kernels.triton_int8 import (
    Int8Weight,
    int8_dynamic_linear,
    int8_weight_only_linear,
    prepare_int8,
)
from autoq.kernels.tuning import KernelConfig

FAMILIES = ("int8_dynamic", "int8_weight_only", "int4")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_LIMIT = 2**31  # kernels index with 32-bit integers


def supports(family: str, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
    if family not in FAMILIES:
        return f"no Triton kernel for family {family!r}"
    if x.device.type == "cpu" and not interpreting():
        return ("the Triton kernels run on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 "
                "(Triton's interpreter, slow: meant for tests)")
    if x.device.type not in ("cuda", "cpu"):
        return f"the Triton kernels run on CUDA tensors, got a {x.device.type} tensor"
    if x.dtype not in ACTIVATION_DTYPES:
        return f"the Triton kernels take fp16, bf16 or fp32 activations, got {x.dtype}"
    n, k = weight.out_features, weight.in_features
    if family == "int4":
        group = weight.group_size or 0
        if group < 32 or group & (group - 1) or k % group:
            return (f"the int4 Triton kernels need a power-of-two group size >= 32 dividing "
                    f"in_features={k}, got {weight.group_size}")
    m = x.shape[0] if x.dim() == 2 else x.numel() // max(k, 1)
    if max(n * k, m * k, m * n) >= _INDEX_LIMIT:
        return "a tensor has 2**31 elements or more, beyond the kernels' 32-bit indexing"
    return None


def prepare(family: str, weight: QuantizedWeight) -> Int8Weight | Int4Weight:
    if family in ("int8_dynamic", "int8_weight_only"):
        return prepare_int8(weight.qweight, weight.scale)
    if family == "int4":
        return prepare_int4(weight.qweight, weight.scale, weight.zero_point, weight.group_size)
    raise ValueError(f"unknown kernel family {family!r}")


def run(family: str, x: torch.Tensor, prepared: Int8Weight | Int4Weight,
        bias: torch.Tensor | None, config: KernelConfig) -> torch.Tensor:
    """``linear`` with an explicit configuration (used by the tuner, tests and benchmarks)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if family == "int8_dynamic":
        return int8_dynamic_linear(x, prepared, bias, config)
    if family == "int8_weight_only":
        return int8_weight_only_linear(x, prepared, bias, config)
    if family == "int4":
        return int4_linear(x, prepared, bias, config)
    raise ValueError(f"unknown kernel family {family!r}")


def choose_config(family: str, x: torch.Tensor, prepared: Int8Weight | Int4Weight,
                  bias: torch.Tensor | None) -> KernelConfig:
    """The configuration ``linear`` uses for this input: fixed without CUDA, else the tuned one
    (tuned on first use of a key, by timing every candidate on ``x``)."""
    m = x.shape[0]
    n, k = prepared.out_features, prepared.in_features
    group = getattr(prepared, "group_size", None)
    if x.device.type != "cuda" or interpreting():
        return tuning.fixed_config(family, m)
    if not tuning.autotune_enabled():
        return tuning.default_config(family, m, k, group)
    tuner = tuning.tuner_for(x.device)
    key = tuning.tuning_key(family, x.dtype, m, n, k, group)
    config = tuner.get(key)
    if config is None:
        def time_ms(candidate: KernelConfig) -> float:
            return triton.testing.do_bench(lambda: run(family, x, prepared, bias, candidate),
                                           warmup=5, rep=20, return_mode="median")

        config = tuner.tune(key, tuning.candidates(family, m, k, group), time_ms)
    return config


def linear(family: str, x: torch.Tensor, prepared: Int8Weight | Int4Weight,
           bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_empty((0, prepared.out_features))
    return run(family, x, prepared, bias, choose_config(family, x, prepared, bias))
