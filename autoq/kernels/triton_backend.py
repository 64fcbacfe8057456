"""Triton backend: our own kernels for the integer formats (see ``autoq.kernels``).

Runs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, which is how
the tests exercise the kernels without a GPU). Kernels and weight layouts are described in
``triton_int8.py`` and ``triton_int4.py``; block configurations come from ``tuning.py``.

Paths per format, chosen by measured time per (M bucket, N, K, group size) on the GPU:

- ``int8_dynamic``: fused per-token quantization, then an int8 tensor-core GEMM with a fused
  scale / bias / cast epilogue (split-K for small M).
- ``int8_weight_only`` and ``int4``: a GEMV (M = 1; split-K only when N gives too few
  programs), a ``tl.dot`` GEMM with in-kernel dequantization (M >= 2: it reads the weight once
  per 16 rows; split-K for small M), or dequantize + cuBLAS.
  Rule: for M >= 17 the tuner also times dequantize-into-the-activation-dtype + cuBLAS and uses
  it where it is faster (large, compute-bound M, where cuBLAS' matmul beats ours by more than
  the one extra pass over the weight costs).

Decode: every call is one kernel launch (split-K finishes in the kernel, see
``triton_common.write_result``), and the configuration is settled at prepare time (tuned, or
read from the tuning cache), so ``linear`` never synchronises and can be captured in a CUDA
graph; its Python cost is a few microseconds on top of Triton's launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.testing

from autoq.formats import QuantizedWeight, register_kernel
from autoq.formats.integer import Int4Groups, Int8Dynamic, Int8WeightOnly
from autoq.kernels import tuning
from autoq.kernels.triton_common import interpreting
from autoq.kernels.triton_int4 import Int4Weight, int4_linear, prepare_int4
from autoq.kernels.triton_int8 import (
    Int8Weight,
    int8_dynamic_linear,
    int8_weight_only_linear,
    prepare_int8,
)
from autoq.kernels.tuning import KernelConfig, Traits

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRETUNE_DTYPE = torch.bfloat16  # tuned at prepare time; other dtypes: the cache or the default


def pretune_buckets() -> tuple[int, ...]:
    """M buckets tuned at prepare time: ``AUTOQ_PRETUNE_M`` (e.g. ``1,16``), default all."""
    text = os.environ.get("AUTOQ_PRETUNE_M", "").strip()
    if not text:
        return tuning.M_BUCKETS
    return tuple(sorted({tuning.m_bucket(int(m)) for m in text.split(",") if m.strip()}))
_INDEX_LIMIT = 2**31  # kernels index with 32-bit integers


class TritonKernel:
    """Shared checks, configuration choice and dispatch; subclasses name their kernels."""

    traits: Traits

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        if x.device.type == "cpu" and not interpreting():
            return ("the Triton kernels run on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 "
                    "(Triton's interpreter, slow: meant for tests)")
        if x.device.type not in ("cuda", "cpu"):
            return f"the Triton kernels run on CUDA tensors, got a {x.device.type} tensor"
        if x.dtype not in ACTIVATION_DTYPES:
            return f"the Triton kernels take fp16, bf16 or fp32 activations, got {x.dtype}"
        n, k = weight.out_features, weight.in_features
        m = x.shape[0] if x.dim() == 2 else x.numel() // max(k, 1)
        # The last element of x a kernel reads is at (m - 1) * (row stride) + k - 1: a padded or
        # sliced x reaches further than m * k.
        row_stride = x.stride(-2) if x.dim() >= 2 and x.stride(-1) == 1 else k
        x_extent = (m - 1) * max(row_stride, k) + k if m else 0
        if max(n * k, x_extent, m * n) >= _INDEX_LIMIT:
            return "a tensor has 2**31 elements or more, beyond the kernels' 32-bit indexing"
        return None

    def _prepare(self, weight: QuantizedWeight) -> Int8Weight | Int4Weight:
        raise NotImplementedError

    def prepare(self, weight: QuantizedWeight) -> Int8Weight | Int4Weight:
        """The kernel's weight layout, with its block configurations settled. On CUDA with
        tuning on, each M bucket (``AUTOQ_PRETUNE_M``, default all) is tuned here for bf16
        activations, or read from the tuning cache, so that ``linear`` only looks
        configurations up: it never times anything, never synchronises, and can be captured
        in a CUDA graph."""
        prepared = self._prepare(weight)
        if (prepared.qweight.device.type == "cuda" and not interpreting()
                and tuning.autotune_enabled()):
            for m in pretune_buckets():
                self.tune(prepared, PRETUNE_DTYPE, m)
        return prepared

    def tune(self, prepared, dtype: torch.dtype, m: int) -> KernelConfig:
        """Settle the configuration of ``prepared`` for (dtype, M bucket of m): the tuning
        cache's, else the fastest candidate timed on random activations (CUDA only)."""
        n, k = prepared.out_features, prepared.in_features
        group = getattr(prepared, "group_size", None)
        tuner = tuning.tuner_for(prepared.qweight.device)
        key = tuning.tuning_key(self.traits, dtype, m, n, k, group)
        config = tuner.get(key)
        if config is None:
            x = torch.randn(tuning.m_bucket(m), k, device=prepared.qweight.device).to(dtype)

            def time_ms(candidate: KernelConfig) -> float:
                return triton.testing.do_bench(lambda: self.run(x, prepared, None, candidate),
                                               warmup=5, rep=20, return_mode="median")

            config = tuner.tune(key, tuning.candidates(self.traits, m, k, group), time_ms)
        prepared.configs[(dtype, tuning.m_bucket(m))] = config
        return config

    def _run(self, x: torch.Tensor, prepared, bias: torch.Tensor | None,
             config: KernelConfig) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor, prepared, bias: torch.Tensor | None,
            config: KernelConfig) -> torch.Tensor:
        """``linear`` with an explicit configuration (used by the tuner, tests and benchmarks)."""
        return self._run(x if x.stride(-1) == 1 else x.contiguous(), prepared, bias, config)

    def choose_config(self, x: torch.Tensor, prepared, bias: torch.Tensor | None = None
                      ) -> KernelConfig:
        """The configuration ``linear`` uses for ``x``: a dictionary lookup once warm. It is
        the one settled at prepare time, else the tuning cache's, else ``default_config``
        (CUDA) or ``fixed_config`` (interpreter). It never times or tunes anything."""
        key = (x.dtype, tuning.m_bucket(x.shape[0]))
        config = prepared.configs.get(key)
        if config is None:
            cuda = x.device.type == "cuda" and not interpreting()
            config = prepared.configs[key] = self.lookup_config(prepared, x.dtype, x.shape[0],
                                                                cuda)
        return config

    def lookup_config(self, prepared, dtype: torch.dtype, m: int, cuda: bool) -> KernelConfig:
        """The configuration for (dtype, M) without timing anything (see ``choose_config``)."""
        if not cuda:
            return tuning.fixed_config(self.traits, m)
        n, k = prepared.out_features, prepared.in_features
        group = getattr(prepared, "group_size", None)
        if tuning.autotune_enabled():
            cached = tuning.tuner_for(prepared.qweight.device).get(
                tuning.tuning_key(self.traits, dtype, m, n, k, group))
            if cached is not None:
                return cached
        return tuning.default_config(self.traits, m, n, k, group, dtype)

    def linear(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, prepared.out_features))
        return self.run(x, prepared, bias, self.choose_config(x, prepared, bias))


@register_kernel("triton", Int8Dynamic)
class Int8DynamicTriton(TritonKernel):
    traits = Traits("int8_dynamic", weight_only=False)

    def _prepare(self, weight: QuantizedWeight) -> Int8Weight:
        return prepare_int8(weight.qweight, weight.scale)

    def _run(self, x, prepared, bias, config):
        return int8_dynamic_linear(x, prepared, bias, config)


@register_kernel("triton", Int8WeightOnly)
class Int8WeightOnlyTriton(TritonKernel):
    traits = Traits("int8_weight_only", weight_only=True, default_gemv_block_n=64,
                    default_gemv_block_k=512,
                    gemv_tiles=((16, 256), (16, 512), (32, 128), (32, 256), (64, 128), (8, 512),
                                (64, 512), (128, 256)))

    def _prepare(self, weight: QuantizedWeight) -> Int8Weight:
        return prepare_int8(weight.qweight, weight.scale)

    def _run(self, x, prepared, bias, config):
        return int8_weight_only_linear(x, prepared, bias, config)


@register_kernel("triton", Int4Groups)
class Int4Triton(TritonKernel):
    traits = Traits("int4", weight_only=True, grouped=True, default_gemv_block_n=128,
                    gemv_tiles=((64, 256), (128, 128), (128, 256), (256, 128), (64, 512)))

    def supports(self, weight: QuantizedWeight, x: torch.Tensor) -> str | None:
        group, k = weight.group_size or 0, weight.in_features
        if group < 32 or group & (group - 1) or k % group:
            return (f"the int4 Triton kernels need a power-of-two group size >= 32 dividing "
                    f"in_features={k}, got {weight.group_size}")
        return super().supports(weight, x)

    def _prepare(self, weight: QuantizedWeight) -> Int4Weight:
        return prepare_int4(weight.qweight, weight.scale, weight.zero_point, weight.group_size)

    def _run(self, x, prepared, bias, config):
        return int4_linear(x, prepared, bias, config)


INT8_DYNAMIC: TritonKernel = Int8Dynamic.kernels["triton"]
INT8_WEIGHT_ONLY: TritonKernel = Int8WeightOnly.kernels["triton"]
INT4: TritonKernel = Int4Groups.kernels["triton"]
