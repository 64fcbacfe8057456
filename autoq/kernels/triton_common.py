"""Pieces shared by the Triton kernels: tile ordering, split-K, int-to-float tricks, outputs.

Split-K: the K range is cut into ``SPLIT_K`` slices (each a multiple of ``BLOCK_K``); every
slice's partial result is added atomically into a zeroed fp32 workspace that all calls share,
and the last slice of a tile to finish writes the sum in the activation dtype and re-zeroes the
workspace (:func:`write_result`): one launch per call. With ``SPLIT_K == 1`` a kernel stores its
result directly. Bias is added by the slice that starts at K = 0 only.

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


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids (``triton.cdiv`` is a jit function: slow from Python)."""
    return -(-a // b)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are converted to fp32 for activations of ``dtype``.

    fp32 activations keep fp32 ("ieee") precision; the interpreter computes bf16 dots wrongly
    (it multiplies the raw 16-bit patterns), so there bf16 is widened to fp32 as well.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(device: torch.device, elements: int,
                      tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace of ``device``: fp32 sums and int32 arrival counters, zeroed. One
    per device, shared by every call (each call leaves it zeroed again; calls on one stream run
    in order); replaced by a larger one when a call needs more."""
    sums, counts = _WORKSPACES.get(device, (None, None))
    if sums is None or sums.numel() < elements or counts.numel() < tiles:
        old = 0 if sums is None else sums.numel()
        sums = torch.zeros(max(elements, old), dtype=torch.float32, device=device)
        counts = torch.zeros(max(tiles, 0 if counts is None else counts.numel(), 1),
                             dtype=torch.int32, device=device)
        _WORKSPACES[device] = (sums, counts)
    return sums, counts


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
def write_result(y_ptrs, acc, mask, sum_ptrs, count_ptr, SPLIT_K: tl.constexpr):
    """Store the fp32 ``acc`` in y's dtype. Split-K: add it into the fp32 workspace
    (``sum_ptrs``, same offsets as y); the last of the tile's SPLIT_K programs to arrive (an
    atomic counter at ``count_ptr``) reads the sums, stores them in y's dtype and zeroes the
    sums and the counter again. So a split-K call is one launch: no memset before, no cast after."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(sum_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # all of this program's sums are in before it counts itself
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # An atomic read (add 0) sees every slice's sum, wherever the caches stand.
            total = tl.atomic_add(sum_ptrs, tl.zeros_like(acc), mask=mask, sem="acquire")
            total = tl.where(mask, total, 0.0)  # masked lanes return no value
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.store(sum_ptrs, tl.zeros_like(acc), mask=mask)
            tl.store(count_ptr, 0)
