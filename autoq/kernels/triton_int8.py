"""Triton kernels for the int8 formats.

Weight layout: the checkpoint's, unchanged: ``qweight`` int8 ``[N, K]`` (K contiguous) and an fp32
per-output-channel ``scale [N]``. Rows that are contiguous in K suit both kernels: the GEMV streams
each row with wide vector loads, and int8 tensor-core dots want K-major operands.

int8_dynamic (W8A8)
    1. :func:`quantize_per_token` — one program per row reads the row once for its absmax and once
       more (from cache) to write int8 values and the fp32 scale. This single kernel replaces
       the ~8 elementwise/reduction kernels of the eager version (abs, amax, div, clamp, div,
       round, clamp, cast), each of which reads and writes a full fp32 copy of ``x``.
    2. :func:`int8_dynamic_linear` — int8 x int8 -> int32 ``tl.dot``; the epilogue applies the
       per-token and per-channel scales and the bias in fp32 and writes the activation dtype,
       so the int32 ``[M, N]`` product never goes to memory (``torch._int_mm`` writes it, and
       scaling, bias and the cast are three more passes over it).
    Quantizing inside the matmul prologue is not done: the scale of a row needs the absmax over
    all of K before its first tile can be quantized, and every column block would redo it.

    Numerics match ``Int8Dynamic.reference_linear`` (autoq.formats.integer), which is
    compressed-tensors' convention (``autoq.primitives.quantize_per_token_int8``): absmax / 127.5
    (correctly rounded division), clamp to [-128, 127], round half to even; the int32
    accumulation is exact. vLLM's kernel uses absmax / 127 and [-127, 127]: within one rounding
    step of this.

int8_weight_only (W8A16)
    - GEMV (M = 1): each program owns ``BLOCK_N`` rows of the weight and one K slice
      (split-K when N gives too few programs), streams the rows with wide loads; the
      per-channel scale is applied once at the end. On CUDA with 16-bit activations, in-bounds
      tiles and aligned rows, a packed PTX path (``_int8_gemv_packed_kernel``) dequantizes two
      weights per instruction into fp16 pairs (~2.3 SASS instructions per weight); otherwise
      fp32 throughout.
    - tiled GEMM: the int8 tile is converted to the activation dtype (exact: |q| <= 127) and fed
      to ``tl.dot``; the scale is applied in the epilogue, so the dequantized weight is exact.
    - dequantize + cuBLAS: a kernel writes ``q * scale`` in the activation dtype, then
      ``F.linear``; used only where the tuner measured it faster (large M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autoq.kernels.triton_common import (
    cdiv,
    dot_in_fp32,
    int8_to_float,
    interpreting,
    split_k_range,
    split_k_workspace,
    tile_ids,
    write_result,
)
from autoq.kernels.tuning import KernelConfig
from autoq.primitives import (
    INT8_ACT_QMAX,
    INT8_ACT_QMIN,
    INT8_ACT_SCALE_DIVISOR,
    INT8_ACT_ZERO_SCALE,
    ROUND_MAGIC,
)

_ROUND_MAGIC = tl.constexpr(ROUND_MAGIC)
_ACT_SCALE_DIVISOR = tl.constexpr(INT8_ACT_SCALE_DIVISOR)
_ACT_ZERO_SCALE = tl.constexpr(INT8_ACT_ZERO_SCALE)
_ACT_QMIN = tl.constexpr(float(INT8_ACT_QMIN))
_ACT_QMAX = tl.constexpr(float(INT8_ACT_QMAX))


@dataclass(frozen=True)
class Int8Weight:
    """Prepared int8 weight: ``qweight`` int8 ``[N, K]`` contiguous, ``scale`` fp32 ``[N]``."""

    qweight: torch.Tensor
    scale: torch.Tensor
    # Block configuration per (activation dtype, M bucket), settled by the backend.
    configs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


def prepare_int8(qweight: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
    return Int8Weight(qweight.contiguous(), scale.float().reshape(-1).contiguous())


# --------------------------------------------------------------------------------------------
# Per-token activation quantization
# --------------------------------------------------------------------------------------------


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm

    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # compressed-tensors' convention (autoq.primitives.quantize_per_token_int8): absmax / 127.5,
    # a zero scale replaced by eps. div_rn: Triton's default fp32 division is approximate;
    # torch's is correctly rounded.
    scale = tl.math.div_rn(tl.max(amax, axis=0), _ACT_SCALE_DIVISOR)
    scale = tl.where(scale == 0.0, _ACT_ZERO_SCALE, scale)

    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        # Clamp to [-128, 127] before the cast (it would wrap, e.g. under TRITON_INTERPRET=1),
        # then round half to even, like torch.round (the same integers as clamping after).
        v = tl.minimum(tl.maximum(v, _ACT_QMIN), _ACT_QMAX)
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
        tl.store(q_row + k0 + offs, v.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


QUANTIZE_BLOCK_K = 4096  # the CUDA block of quantize_per_token (8 warps)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[M, K]`` and fp32 scales ``[M]`` of a 2-D activation (one kernel launch)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    block_k = min(triton.next_power_of_2(k), 64 if interpreting() else QUANTIZE_BLOCK_K)
    num_warps = 8 if block_k >= 2048 else 4
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                num_warps=num_warps)
    return q, scale


# --------------------------------------------------------------------------------------------
# int8_dynamic: int8 x int8 -> int32 with a fused scale / bias epilogue
# --------------------------------------------------------------------------------------------


@triton.jit
def _int8_dynamic_mm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_b,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc)

    x_scale = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    write_result(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 m_mask[:, None] & n_mask[None, :], sum_ptr + offs_m[:, None] * N + offs_n[None, :],
                 count_ptr + tl.program_id(0), SPLIT_K)


def dynamic_mm_constexprs(config: KernelConfig, has_bias: bool) -> dict:
    """The int8_dynamic GEMM's compile-time arguments for ``config`` (shared with ``aot.py``)."""
    return dict(HAS_BIAS=has_bias, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=config.split_k)


def int8_dynamic_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None,
                        config: KernelConfig) -> torch.Tensor:
    """``y = (quant(x) @ qweight.T) * x_scale * w_scale + bias`` in ``x.dtype``."""
    if config.kernel != "mm":
        raise ValueError(f"int8_dynamic has only the 'mm' kernel, not {config.kernel!r}")
    xq, xs = quantize_per_token(x)
    m, k = xq.shape
    n = w.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n), config.split_k)
    sums, counts = split_k_workspace(x.device, m * n, grid[0])
    _int8_dynamic_mm_kernel[grid](
        xq, xs, w.qweight, w.scale, bias if bias is not None else y, y, sums, counts,
        m, n, k, xq.stride(0), w.qweight.stride(0), y.stride(0),
        0 if bias is None else bias.stride(0),
        **dynamic_mm_constexprs(config, bias is not None),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


# --------------------------------------------------------------------------------------------
# int8_weight_only: GEMV, tiled GEMM, dequantize
# --------------------------------------------------------------------------------------------


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
    N, K, stride_xm, stride_wn, stride_ym, stride_b,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn

    # A 2-D accumulator defers the cross-lane reduction to after the loop.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        x = tl.load(x_row + ks, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += int8_to_float(w) * x[None, :]

    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)
    write_result(y_ptr + row * stride_ym + offs_n, y, n_mask, sum_ptr + row * N + offs_n,
                 count_ptr + row * tl.num_programs(0) + pid_n, SPLIT_K)


# The CUDA GEMV for 16-bit activations dequantizes two weights per instruction into fp16 pairs.
# prmt (byte permute) puts two weight bytes under the high byte 0x64 of two fp16 halves: the
# fp16 1024 + u, for u = q + 128 (the sign bit flipped first, one xor per 4 weights), so one
# add of -1152 gives the exact q. Products are summed in fp16 pairs over 16 weights, then in
# fp32. Activations enter as fp16 pairs divided by X_PRESCALE (bf16 ones converted, once per
# thread and K chunk), so that the fp16 sums stay in range.
X_PRESCALE = tl.constexpr(256.0)


def _int8_dot_ptx() -> str:
    """PTX: fp32 sum of 16 weights ($1..$4: 4 words of 4 int8) times 16 activations ($5..$12:
    fp16 pairs (x[2t], x[2t + 1]) / X_PRESCALE)."""
    lines = ["{", ".reg .b32 t, a, b, acc, m, lo32, hi32;", ".reg .b16 lo, hi;",
             "mov.b32 m, 0xE480E480;", "mov.b32 acc, 0;"]  # fp16 -1152 in both halves
    for r in range(4):
        lines += [f"xor.b32 t, ${1 + r}, 0x80808080;",
                  "prmt.b32 a, t, 0x64646464, 0x4140;", "prmt.b32 b, t, 0x64646464, 0x4342;",
                  "add.f16x2 a, a, m;", "add.f16x2 b, b, m;",
                  f"fma.rn.f16x2 acc, a, ${5 + 2 * r}, acc;",
                  f"fma.rn.f16x2 acc, b, ${6 + 2 * r}, acc;"]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 lo32, lo;", "cvt.f32.f16 hi32, hi;",
              "add.f32 $0, lo32, hi32;", "}"]
    return "\n".join(lines)


def _int8_x_ptx(bf16: bool) -> str:
    """PTX: 16 activations from one 16-byte-aligned address ($8) as 8 fp16 pairs ($0..$7),
    divided by X_PRESCALE (exact in fp16; bf16 via fp32, correctly rounded to fp16)."""
    lines = ["{", ".reg .b32 p<8>, s, f0, f1;"]
    lines += ["ld.global.nc.v4.b32 {p0, p1, p2, p3}, [$8];",
              "ld.global.nc.v4.b32 {p4, p5, p6, p7}, [$8 + 16];"]
    if bf16:
        lines.append("mov.b32 s, 0x3B800000;")  # fp32 1/256
        for i in range(8):
            lines += [f"shl.b32 f0, p{i}, 16;", f"and.b32 f1, p{i}, 0xFFFF0000;",
                      "mul.f32 f0, f0, s;", "mul.f32 f1, f1, s;",
                      f"cvt.rn.f16x2.f32 ${i}, f1, f0;"]
    else:
        lines.append("mov.b32 s, 0x1C001C00;")  # fp16 1/256
        lines += [f"mul.rn.f16x2 ${i}, p{i}, s;" for i in range(8)]
    return "\n".join(lines + ["}"])


_INT8_DOT_PTX = tl.constexpr(_int8_dot_ptx())
_INT8_X_PTX_FP16 = tl.constexpr(_int8_x_ptx(bf16=False))
_INT8_X_PTX_BF16 = tl.constexpr(_int8_x_ptx(bf16=True))
_LOAD16_PTX = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")


@triton.jit
def _int8_gemv_packed_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
    N, K, stride_xm, stride_wn, stride_ym, stride_b,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    BF16: tl.constexpr,
):
    # CUDA only, every tile in bounds, 16-byte aligned rows (wrapper). The tile is
    # [BLOCK_N rows, BLOCK_K / 16 chunks of 16 weights]; loads are PTX, so that Triton keeps
    # weights, activations and results in one layout (its own loads would each get a layout
    # of their own, and shuffles through shared memory between them).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K // 16) * 16
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :]  # [rows, chunks]
    x_chunks = x_ptr + row * stride_xm + offs_c[None, :]  # [1, chunks]

    acc = tl.zeros((BLOCK_N, BLOCK_K // 16), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            _LOAD16_PTX, "=r,=r,=r,=r,l", [w_rows + k0], dtype=(tl.int32,) * 4, is_pure=True,
            pack=1)
        x = tl.inline_asm_elementwise(
            _INT8_X_PTX_BF16 if BF16 else _INT8_X_PTX_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,l",
            [x_chunks + k0], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        acc += tl.inline_asm_elementwise(_INT8_DOT_PTX, "=r" + ",r" * 12, (w0, w1, w2, w3) + x,
                                         dtype=tl.float32, is_pure=True, pack=1)

    y = tl.sum(acc, axis=1) * (tl.load(s_ptr + offs_n) * X_PRESCALE)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b).to(tl.float32)
    write_result(y_ptr + row * stride_ym + offs_n, y, offs_n < N, sum_ptr + row * N + offs_n,
                 count_ptr + row * tl.num_programs(0) + pid_n, SPLIT_K)


@triton.jit
def _int8_weight_only_mm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_b,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + ks[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, int8_to_float(b).to(a.dtype), acc, input_precision=DOT_PRECISION)

    y = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    write_result(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 m_mask[:, None] & n_mask[None, :], sum_ptr + offs_m[:, None] * N + offs_n[None, :],
                 count_ptr + tl.program_id(0), SPLIT_K)


@triton.jit
def _int8_dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_on,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = int8_to_float(w) * s[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


DEQUANT_BLOCKS = dict(BLOCK_N=32, BLOCK_K=128)


def dequantize_int8(w: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """``qweight * scale`` as ``[N, K]`` in ``dtype`` (one pass)."""
    n, k = w.qweight.shape
    out = torch.empty((n, k), dtype=dtype, device=w.qweight.device)
    grid = (cdiv(n, DEQUANT_BLOCKS["BLOCK_N"]), cdiv(k, DEQUANT_BLOCKS["BLOCK_K"]))
    _int8_dequantize_kernel[grid](w.qweight, w.scale, out, n, k, w.qweight.stride(0),
                                  out.stride(0), **DEQUANT_BLOCKS)
    return out


def gemv_constexprs(config: KernelConfig, has_bias: bool, packed: bool = False,
                    dtype: torch.dtype | None = None) -> dict:
    """The GEMV kernels' compile-time arguments for ``config`` (shared with ``aot.py``)."""
    out = dict(HAS_BIAS=has_bias, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
               SPLIT_K=config.split_k)
    return {**out, "BF16": dtype == torch.bfloat16} if packed else out


def gemv_packed(x: torch.Tensor, w: Int8Weight, config: KernelConfig) -> bool:
    """Whether the packed CUDA GEMV runs: 16-bit activations, every tile in bounds, and rows of
    x and the weight that start 16-byte aligned (its loads are 16 bytes wide)."""
    n, k = w.qweight.shape
    return (x.dtype in (torch.float16, torch.bfloat16) and not interpreting()
            and n % config.block_n == 0 and k % (config.block_k * config.split_k) == 0
            and config.block_k % 16 == 0
            and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0
            and w.qweight.data_ptr() % 16 == 0 and w.qweight.stride(0) % 16 == 0)


def weight_only_mm_constexprs(config: KernelConfig, has_bias: bool, dtype: torch.dtype) -> dict:
    """The weight-only GEMM's compile-time arguments for ``config`` (shared with ``aot.py``)."""
    dot_f32 = dot_in_fp32(dtype)
    return dict(HAS_BIAS=has_bias, DOT_F32=dot_f32, DOT_PRECISION="ieee" if dot_f32 else "tf32",
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                GROUP_M=config.group_m, SPLIT_K=config.split_k)


def int8_weight_only_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None,
                            config: KernelConfig) -> torch.Tensor:
    """``y = x @ (qweight * scale).T + bias`` in ``x.dtype``, by the kernel ``config`` names."""
    m, k = x.shape
    n = w.out_features
    if config.kernel == "dequant":
        return F.linear(x, dequantize_int8(w, x.dtype), None if bias is None else bias.to(x.dtype))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bias_arg, stride_b = (bias, bias.stride(0)) if bias is not None else (y, 0)
    if config.kernel == "gemv":
        packed = gemv_packed(x, w, config)
        grid = (cdiv(n, config.block_n), config.split_k, m)
        sums, counts = split_k_workspace(x.device, m * n, grid[0] * m)
        (_int8_gemv_packed_kernel if packed else _int8_gemv_kernel)[grid](
            x, w.qweight, w.scale, bias_arg, y, sums, counts, n, k, x.stride(0),
            w.qweight.stride(0), y.stride(0),
            stride_b, **gemv_constexprs(config, bias is not None, packed, x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    elif config.kernel == "mm":
        grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n), config.split_k)
        sums, counts = split_k_workspace(x.device, m * n, grid[0])
        _int8_weight_only_mm_kernel[grid](
            x, w.qweight, w.scale, bias_arg, y, sums, counts, m, n, k,
            x.stride(0), w.qweight.stride(0), y.stride(0), stride_b,
            **weight_only_mm_constexprs(config, bias is not None, x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        raise ValueError(f"unknown int8_weight_only kernel {config.kernel!r}")
    return y
