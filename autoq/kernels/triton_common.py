"""Pieces shared by the Triton kernels: tile ordering, split-K, int-to-float tricks, outputs.

Split-K: the K range is cut into ``SPLIT_K`` slices (each a multiple of ``BLOCK_K``); every
slice's partial result is added atomically into an fp32 buffer, which is cast to the activation
dtype afterwards. With ``SPLIT_K == 1`` a kernel stores its result in the activation dtype
directly. Bias is added by the slice that starts at K = 0 only.

Integer to float conversion (``I2F``) runs at a quarter of the fp32 rate on recent NVIDIA GPUs and
would bound the memory-bound GEMV paths. Instead, a small integer ``v`` is OR-ed into the
mantissa of the fp32 number 2**23: the bit pattern ``0x4B000000 | v`` *is* the float
``2**23 + v`` for ``0 <= v < 2**23``. Subtracting another such "magic" float is then exact.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# fp32 bits of 2**23; OR-ing v < 2**23 into them gives the float 2**23 + v.
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC = tl.constexpr(8388608.0)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are converted to fp32 for activations of ``dtype``.

    fp32 activations keep fp32 ("ieee") precision; the interpreter computes bf16 dots wrongly
    (it multiplies the raw 16-bit patterns), so there bf16 is widened to fp32 as well.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def output_buffer(m: int, n: int, dtype: torch.dtype, device: torch.device,
                  split_k: int) -> torch.Tensor:
    """Where a kernel writes ``[m, n]``: the result itself, or a zeroed fp32 split-K buffer."""
    if split_k == 1:
        return torch.empty((m, n), dtype=dtype, device=device)
    return torch.zeros((m, n), dtype=torch.float32, device=device)


@triton.jit
def magic_float(v):
    """``2**23 + v`` as fp32 for an integer tensor ``v`` in [0, 2**23), without an I2F."""
    return (v.to(tl.int32) | MAGIC_BITS).to(tl.float32, bitcast=True)


@triton.jit
def int8_to_float(w):
    """Exact fp32 value of an int8 tensor via the magic-number trick (offset by 128 first)."""
    return magic_float(w.to(tl.int32) + 128) - (MAGIC + 128.0)


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order: ``GROUP_M`` consecutive
    row blocks walk the same column blocks, so their weight tiles are reused from L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def split_k_range(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[start, end)`` of split ``pid_k``'s slice of K; starts are multiples of BLOCK_K."""
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    start = pid_k * per_split
    end = tl.minimum(start + per_split, K)
    return start, end


@triton.jit
def write_result(ptrs, acc, mask, SPLIT_K: tl.constexpr):
    """Store the fp32 ``acc`` in the output dtype, or add it into the fp32 split-K buffer."""
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
