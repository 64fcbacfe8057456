"""Triton kernels for the int4 formats (W4A16, asymmetric, groups of G along K).

Prepared layout (built once by :func:`prepare_int4` from the checkpoint layout):

- ``qweight`` int32 ``[K // 8, N]`` — K-major: word ``(j, n)`` holds ``q[n, 8j + i]`` in bits
  ``4i .. 4i+3`` (i = 0..7). Rows are contiguous in N, so a program that owns a block of
  columns reads 16-byte vectors of 32 nibbles that all belong to distinct columns, and the GEMM
  loads its ``[BLOCK_K, BLOCK_N]`` operand tile with coalesced, vectorized column loads.
- ``scale`` fp16 ``[K // G, N]`` and ``zero_point`` uint8 ``[K // G, N]`` — transposed the same
  way, so a K tile's per-group parameters are one contiguous row.

Same bytes as the checkpoint (0.5 byte per weight plus 3 bytes per group); ``w = (q - zp) * scale``.

Kernels:

- GEMV (M <= 4, split-K): each program owns ``BLOCK_N`` columns and one K slice and streams
  ``[BLOCK_K // 8, BLOCK_N]`` word tiles. Each of the 8 nibbles of a word is turned into a float
  with the magic-number trick (no I2F), ``q - zp`` is exact, and the per-group scale multiplies
  a partial sum over the word's 8 values rather than each value. fp32 throughout.
- tiled GEMM (``tl.dot``, optionally split-K for small M): a ``[BLOCK_K, BLOCK_N]`` tile is
  unpacked, dequantized (``BLOCK_K`` divides G, so one scale / zero point per column and tile)
  and converted to the activation dtype in registers, then fed to ``tl.dot`` (fp32 accumulation).
- dequantize + cuBLAS: a kernel writes the dequantized ``W^T`` in the activation dtype, then
  ``F.linear``; used only where the tuner measured it faster (large M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autoq.kernels.triton_common import (
    dot_in_fp32,
    magic_float,
    output_buffer,
    split_k_range,
    tile_ids,
    write_result,
)
from autoq.kernels.tuning import KernelConfig


@dataclass(frozen=True)
class Int4Weight:
    """Prepared int4 weight in the K-major layout described in the module docstring."""

    qweight: torch.Tensor  # int32 [K // 8, N]
    scale: torch.Tensor  # fp16 [K // G, N]
    zero_point: torch.Tensor  # uint8 [K // G, N]
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8


def prepare_int4(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 group_size: int) -> Int4Weight:
    """Convert the checkpoint layout (uint8 ``[N, K // 2]``, low nibble = even element) to
    the K-major int32 layout. Runs once per module and device."""
    n, half_k = qweight.shape
    k = half_k * 2
    if k % 8 != 0:
        raise ValueError(f"the int4 Triton layout needs in_features % 8 == 0, got {k}")
    packed = qweight.to(torch.int64)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k)  # [N, K] values 0..15
    q = q.t().reshape(k // 8, 8, n)
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).view(1, 8, 1)
    words = (q << shifts).sum(dim=1)  # [K // 8, N], values in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return Int4Weight(
        qweight=words.contiguous(),
        scale=scale.to(torch.float16).t().contiguous(),
        zero_point=zero_point.to(torch.uint8).t().contiguous(),
        group_size=group_size,
    )


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    N, K, stride_xm, stride_ym, stride_b,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 8)  # word rows of a tile
    n_mask = offs_n < N
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    x_row = x_ptr + row * stride_xm

    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + 8 * offs_j  # first K index of each word row; its 8 values share a group
        j_mask = ks < k_end
        mask = j_mask[:, None] & n_mask[None, :]
        words = tl.load(qw_ptr + (ks // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        group_offs = (ks // GROUP_SIZE)[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
        magic_zero = magic_float(tl.load(z_ptr + group_offs, mask=mask, other=0))

        part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(8):
            x = tl.load(x_row + ks + i, mask=j_mask, other=0.0).to(tl.float32)
            q_minus_zero = magic_float((words >> (4 * i)) & 0xF) - magic_zero  # exact
            part += q_minus_zero * x[:, None]
        acc += part * scale

    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)
    write_result(y_ptr + row * stride_ym + offs_n, y, n_mask, SPLIT_K)


@triton.jit
def _int4_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, stride_b,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide the group size")
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = (offs_k % 8) * 4  # tile starts are multiples of 8, so this is (k % 8) * 4
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        # Each word is loaded by the 8 rows of K it holds; the repeats are served by L1.
        words = tl.load(qw_ptr + (ks // 8)[:, None] * N + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0)
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        magic_zero = magic_float(tl.load(z_ptr + group * N + offs_n, mask=n_mask, other=0))
        w = (magic_float((words >> shifts[:, None]) & 0xF) - magic_zero[None, :]) * scale[None, :]
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)

    y = acc
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    write_result(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _int4_dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
                            GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    group_offs = (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :]
    scale = tl.load(s_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
    magic_zero = magic_float(tl.load(z_ptr + group_offs, mask=mask, other=0))
    q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
    w = (magic_float(q) - magic_zero) * scale
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


DEQUANT_BLOCKS = dict(BLOCK_K=64, BLOCK_N=64)


def dequantize_int4_t(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, transposed: ``W^T`` as ``[K, N]`` in ``dtype`` (one pass)."""
    k, n = w.in_features, w.out_features
    out = torch.empty((k, n), dtype=dtype, device=w.qweight.device)
    grid = (triton.cdiv(k, DEQUANT_BLOCKS["BLOCK_K"]), triton.cdiv(n, DEQUANT_BLOCKS["BLOCK_N"]))
    _int4_dequantize_kernel[grid](w.qweight, w.scale, w.zero_point, out, n, k,
                                  GROUP_SIZE=w.group_size, **DEQUANT_BLOCKS)
    return out


def gemv_constexprs(config: KernelConfig, group_size: int, has_bias: bool) -> dict:
    """The GEMV kernel's compile-time arguments for ``config`` (shared with ``aot.py``)."""
    return dict(GROUP_SIZE=group_size, HAS_BIAS=has_bias, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, SPLIT_K=config.split_k)


def mm_constexprs(config: KernelConfig, group_size: int, has_bias: bool,
                  dtype: torch.dtype) -> dict:
    """The GEMM kernel's compile-time arguments for ``config`` (shared with ``aot.py``)."""
    dot_f32 = dot_in_fp32(dtype)
    return dict(GROUP_SIZE=group_size, HAS_BIAS=has_bias, DOT_F32=dot_f32,
                DOT_PRECISION="ieee" if dot_f32 else "tf32", BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                SPLIT_K=config.split_k)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None,
                config: KernelConfig) -> torch.Tensor:
    """``y = x @ dequant(W).T + bias`` in ``x.dtype``, by the kernel ``config`` names."""
    m, k = x.shape
    n = w.out_features
    if config.kernel == "dequant":
        w_t = dequantize_int4_t(w, x.dtype)
        return F.linear(x, w_t.t(), None if bias is None else bias.to(x.dtype))
    y = output_buffer(m, n, x.dtype, x.device, config.split_k)
    bias_arg, stride_b = (bias, bias.stride(0)) if bias is not None else (y, 0)
    if config.kernel == "gemv":
        grid = (triton.cdiv(n, config.block_n), config.split_k, m)
        _int4_gemv_kernel[grid](
            x, w.qweight, w.scale, w.zero_point, bias_arg, y, n, k, x.stride(0), y.stride(0),
            stride_b, **gemv_constexprs(config, w.group_size, bias is not None),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    elif config.kernel == "mm":
        if w.group_size % config.block_k != 0:
            raise ValueError(f"block_k={config.block_k} must divide the group size {w.group_size}")
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
        _int4_mm_kernel[grid](
            x, w.qweight, w.scale, w.zero_point, bias_arg, y, m, n, k, x.stride(0), y.stride(0),
            stride_b, **mm_constexprs(config, w.group_size, bias is not None, x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        raise ValueError(f"unknown int4 kernel {config.kernel!r}")
    return y.to(x.dtype)
