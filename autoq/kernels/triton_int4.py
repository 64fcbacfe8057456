"""Triton kernels for the int4 formats (W4A16, asymmetric, groups of G along K).

Prepared layout (built once by :func:`prepare_int4` from the checkpoint layout):

- ``qweight`` int32 ``[K // 8, N]`` — K-major: word ``(j, n)`` holds ``q[n, 8j + i]`` in the
  nibble at position ``p(i) = i // 2 + 4 * (i % 2)`` (bits ``4p .. 4p+3``): K pairs
  ``(8j + 2t, 8j + 2t + 1)`` sit in nibble ``t`` of the low and of the high 16-bit half, so one
  AND/OR (``lop3``) with ``0x000F000F << 4t`` turns a pair into a 16-bit float pair matching the
  consecutive activations ``x[8j + 2t], x[8j + 2t + 1]`` of one 32-bit load. Rows are
  contiguous in N, so a program that owns a block of columns reads 16-byte vectors of 32
  nibbles that all belong to distinct columns.
- ``scale`` fp16 ``[K // G, N]`` and ``zero_point`` uint8 ``[K // G, N]`` — transposed the same
  way, so a K tile's per-group parameters are one contiguous row.

Same bytes as the checkpoint (0.5 byte per weight plus 3 bytes per group); ``w = (q - zp) * scale``.

Kernels:

- GEMV (M = 1; split-K when N gives too few programs): each program owns ``BLOCK_N`` columns
  and one K slice; a K tile is cut into segments (one per row of the thread layout, each inside
  one group) so that a thread loads and prepares a scale / zero point once per segment and
  column. On CUDA with 16-bit activations (``PACKED``) the dequantization is PTX that handles
  two weights per instruction (``_dot_ptx``: lop3 into fp16 / bf16 pairs, packed add / fma),
  activations come in 16-byte loads, and the products are summed in 16-bit pairs over 4 words
  before fp32: ~2.3 SASS instructions per weight (``python -m autoq.kernels.aot``). Elsewhere
  (fp32, the interpreter) the plain path turns each nibble into a float with the magic-number
  trick (no I2F): ``q - zp`` is exact, fp32 throughout.
- tiled GEMM (``tl.dot``, optionally split-K for small M): each packed word is loaded once per
  tile (``[BLOCK_K // 8, BLOCK_N]``: half the int8 kernel's bytes per pipeline stage) and
  repeated in registers for its 8 K rows; ``q - zp`` stays an exact int8 until it becomes the
  dot operand, and the tile's scale (``BLOCK_K`` divides G) multiplies the tile's product.
- dequantize + cuBLAS: a kernel writes the dequantized ``W^T`` in the activation dtype, then
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
    interpreting,
    magic_float,
    split_k_range,
    split_k_workspace,
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
    # Block configuration per (activation dtype, M bucket), settled by the backend.
    configs: dict = field(default_factory=dict, compare=False, repr=False)

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
    i = torch.arange(8, device=q.device, dtype=torch.int64)
    shifts = (4 * (i // 2 + 4 * (i % 2))).view(1, 8, 1)  # nibble position p(i), see above
    words = (q << shifts).sum(dim=1)  # [K // 8, N], values in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return Int4Weight(
        qweight=words.contiguous(),
        scale=scale.to(torch.float16).t().contiguous(),
        zero_point=zero_point.to(torch.uint8).t().contiguous(),
        group_size=group_size,
    )


@triton.jit
def nibble_shift(i):
    """Bit offset of the nibble holding K index ``8j + i`` in its word (see the layout)."""
    return 4 * (i // 2 + 4 * (i % 2))


WORDS_PER_CALL = 4  # word rows of one column that one PTX call dequantizes and sums
X_PRESCALE = tl.constexpr(256.0)  # fp16 activations are divided by this before the fp16 products (range)


def _dot_ptx(bf16: bool) -> str:
    """PTX for 4 words (32 weights) of one column: fp32 ``sum (q - z) * x``.

    Operands: $0 the result; $1..$4 the words of K rows 8j .. 8j + 31; $5 the zero point as
    -(M + z) in both 16-bit halves (M = 1024 for fp16, 128 for bf16); $6 (fp16 only) -(64 + z);
    $7..$22 the activations as 32-bit pairs (x[2t], x[2t + 1]), 4 per word.

    A nibble OR-ed into the mantissa of the float M (one ``lop3`` per pair: AND a mask, OR M)
    is M + q, so one add of -(M + z) gives the exact q - z for two weights at once; fp16 also
    reads the nibbles 4 bits up in place (M + 16q: one fma by 1/16 and -(64 + z)), bf16 (7
    mantissa bits) shifts them down first. The products are summed in 16-bit pairs over the
    4 words (q - z is exact; the sums round like the activation dtype), then once in fp32.
    """
    lines = ["{", ".reg .b32 w4, w8, w12, a, b, c, d, acc, k, lo32, hi32;", ".reg .b16 lo, hi;"]
    if bf16:
        lines += ["mov.b32 k, 0x3F803F80;", "mov.b32 acc, 0x80008000;"]  # 1.0 and -0.0
    else:
        lines += ["mov.b32 k, 0x2C002C00;", "mov.b32 acc, 0;"]  # 1/16
    for r in range(WORDS_PER_CALL):
        word = f"${1 + r}"
        x = [f"${7 + 4 * r + t}" for t in range(4)]
        if bf16:
            lines += [f"shr.u32 w4, {word}, 4;", f"shr.u32 w8, {word}, 8;",
                      f"shr.u32 w12, {word}, 12;"]
            for reg, src in zip("abcd", (word, "w4", "w8", "w12"), strict=True):
                lines += [f"lop3.b32 {reg}, {src}, 0x000F000F, 0x43004300, 0xEA;",
                          f"fma.rn.bf16x2 {reg}, {reg}, k, $5;"]
            fma = "fma.rn.bf16x2"
        else:
            lines += [f"shr.u32 w8, {word}, 8;",
                      f"lop3.b32 a, {word}, 0x000F000F, 0x64006400, 0xEA;",
                      f"lop3.b32 b, {word}, 0x00F000F0, 0x64006400, 0xEA;",
                      "lop3.b32 c, w8, 0x000F000F, 0x64006400, 0xEA;",
                      "lop3.b32 d, w8, 0x00F000F0, 0x64006400, 0xEA;",
                      "add.f16x2 a, a, $5;", "fma.rn.f16x2 b, b, k, $6;",
                      "add.f16x2 c, c, $5;", "fma.rn.f16x2 d, d, k, $6;"]
            fma = "fma.rn.f16x2"
        lines += [f"{fma} acc, {reg}, {xr}, acc;" for reg, xr in zip("abcd", x, strict=True)]
    if bf16:  # a bf16 is the top half of an fp32
        lines += ["shl.b32 lo32, acc, 16;", "and.b32 hi32, acc, 0xFFFF0000;"]
    else:
        lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 lo32, lo;", "cvt.f32.f16 hi32, hi;"]
    lines += ["add.f32 $0, lo32, hi32;", "}"]
    return "\n".join(lines)


def _x_load_ptx(fp16: bool) -> str:
    """PTX loading the activation pairs of 4 word rows: four 16-byte loads from one address
    ($16; 16-byte aligned, see the wrapper) into $0..$15; fp16 pairs are also divided by
    X_PRESCALE (exact) so that the fp16 sums of products stay in range."""
    lines = ["{", ".reg .b32 s;", "mov.b32 s, 0x1C001C00;"] if fp16 else ["{"]
    for r in range(WORDS_PER_CALL):
        outs = ", ".join(f"${4 * r + t}" for t in range(4))
        lines.append(f"ld.global.nc.v4.b32 {{{outs}}}, [$16 + {16 * r}];")
    if fp16:
        lines += [f"mul.rn.f16x2 ${i}, ${i}, s;" for i in range(4 * WORDS_PER_CALL)]
    return "\n".join(lines + ["}"])


_DOT_PTX_FP16 = tl.constexpr(_dot_ptx(bf16=False))
_DOT_PTX_BF16 = tl.constexpr(_dot_ptx(bf16=True))
_X_LOAD_FP16 = tl.constexpr(_x_load_ptx(fp16=True))
_X_LOAD_BF16 = tl.constexpr(_x_load_ptx(fp16=False))
_DOT_CONSTRAINTS = tl.constexpr("=r" + ",r" * (2 + 5 * WORDS_PER_CALL))
_X_LOAD_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["l"]))
_PRESCALE_PTX = tl.constexpr("{.reg .b32 s; mov.b32 s, 0x1C001C00; mul.rn.f16x2 $0, $1, s;}")


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    """``tl.load`` that skips the mask when the tile is known to be in bounds."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _zero_operands(zero, BF16: tl.constexpr):
    """The zero point as the 16-bit float pairs :func:`_dot_ptx` adds ($5, $6)."""
    z = zero.to(tl.int32)
    if BF16:
        neg_z = (z | 0xC300) * 0x10001  # bf16 -(128 + z) in both halves
        return neg_z, neg_z  # the second is unused
    return (z | 0xE400) * 0x10001, ((z << 4) | 0xD400) * 0x10001  # fp16 -(1024 + z), -(64 + z)


@triton.jit
def _x_pairs(ptrs, mask, EVEN: tl.constexpr, BF16: tl.constexpr):
    """The 16 activation pairs (int32 ``x[2t] | x[2t + 1] << 16``) of 4 word rows from
    ``ptrs`` (int32 pointers, ``[segments, 1]``). In bounds: one PTX call, four 16-byte loads
    (Triton would issue 4-byte loads, the pairs being separate tensors)."""
    if EVEN:
        return tl.inline_asm_elementwise(_X_LOAD_BF16 if BF16 else _X_LOAD_FP16,
                                         _X_LOAD_CONSTRAINTS, [ptrs], dtype=(tl.int32,) * 16,
                                         is_pure=True, pack=1)
    pairs = ()
    for t in tl.static_range(16):
        pair = tl.load(ptrs + t, mask=mask, other=0)
        if not BF16:
            pair = tl.inline_asm_elementwise(_PRESCALE_PTX, "=r,r", [pair], dtype=tl.int32,
                                             is_pure=True, pack=1)
        pairs = pairs + (pair,)
    return pairs


@triton.jit
def _dot_plain(words, zero, x_row, ks, k_mask):
    """fp32 ``sum (q - z) * x`` over each word's 8 weights in plain Triton (the interpreter's
    path): each nibble becomes fp32 ``2**23 + q`` by the magic-number trick, so ``q - z`` is
    exact."""
    magic_zero = magic_float(zero)
    part = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        x = tl.load(x_row + ks + i, mask=k_mask, other=0.0).to(tl.float32)
        part += (magic_float((words >> nibble_shift(i)) & 0xF) - magic_zero) * x
    return part


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
    N, K, stride_xm, stride_ym, stride_b,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SEGMENTS: tl.constexpr, EVEN: tl.constexpr, PACKED: tl.constexpr, BF16: tl.constexpr,
):
    # A K tile is cut into SEGMENTS segments of SEG values, each inside one group; the tile
    # [segments, columns] is walked one word row of every segment at a time. Each thread then
    # owns whole segments: it loads and prepares a scale and zero point once per segment and
    # column, in the layout of the words (nothing goes through shared memory).
    SEG: tl.constexpr = BLOCK_K // SEGMENTS
    tl.static_assert(GROUP_SIZE % SEG == 0, "a segment lies inside one group")
    tl.static_assert(not PACKED or SEG % (8 * 4) == 0, "the packed path takes 4 words a call")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SEGMENTS) * SEG
    n_mask = offs_n < N
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    xp = x_row.to(tl.pointer_type(tl.int32), bitcast=True)  # aligned row start (wrapper)

    acc = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = (k0 + offs_s)[:, None]  # [segments, 1]: first K index of each segment
        s_mask = ks < k_end
        mask = s_mask & n_mask[None, :]
        g_offs = (ks // GROUP_SIZE) * N + offs_n[None, :]
        scale = _load(s_ptr + g_offs, mask, EVEN).to(tl.float32)
        zero = _load(z_ptr + g_offs, mask, EVEN)
        words_ptrs = qw_ptr + (ks // 8) * N + offs_n[None, :]
        if PACKED:
            neg_z, neg_z16 = _zero_operands(zero, BF16)
            if not BF16:
                scale = scale * X_PRESCALE  # undo the activations' prescale
            part = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(0, SEG // 8, 4):
                w0 = _load(words_ptrs + j * N, mask, EVEN)
                w1 = _load(words_ptrs + (j + 1) * N, mask, EVEN)
                w2 = _load(words_ptrs + (j + 2) * N, mask, EVEN)
                w3 = _load(words_ptrs + (j + 3) * N, mask, EVEN)
                x = _x_pairs(xp + (ks + 8 * j) // 2, s_mask, EVEN, BF16)
                part += tl.inline_asm_elementwise(
                    _DOT_PTX_BF16 if BF16 else _DOT_PTX_FP16, _DOT_CONSTRAINTS,
                    (w0, w1, w2, w3, neg_z, neg_z16) + x, dtype=tl.float32, is_pure=True,
                    pack=1)
        else:
            part = tl.zeros((SEGMENTS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(SEG // 8):
                words = _load(words_ptrs + j * N, mask, EVEN)
                part += _dot_plain(words, zero, x_row, ks + 8 * j, s_mask)
        acc += part * scale

    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)
    write_result(y_ptr + row * stride_ym + offs_n, y, n_mask, sum_ptr + row * N + offs_n,
                 count_ptr + row * tl.num_programs(0) + pid_n, SPLIT_K)


@triton.jit
def _int4_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, sum_ptr, count_ptr,
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
    offs_w = tl.arange(0, BLOCK_K // 8)  # word rows of a tile
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = nibble_shift(offs_k % 8)  # tile starts are multiples of 8
    k_start, k_end = split_k_range(K, pid_k, SPLIT_K, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        # Each packed word is loaded once, [BLOCK_K / 8, BLOCK_N], and repeated in registers
        # for the 8 K rows it holds.
        ws = k0 + 8 * offs_w
        words = tl.load(qw_ptr + (ws // 8)[:, None] * N + offs_n[None, :],
                        mask=(ws < k_end)[:, None] & n_mask[None, :], other=0)
        words = tl.reshape(tl.broadcast_to(words[:, None, :], (BLOCK_K // 8, 8, BLOCK_N)),
                           (BLOCK_K, BLOCK_N))
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group * N + offs_n, mask=n_mask, other=0).to(tl.int8)
        # q - z is an exact small integer: int8 until the dot operand (so that Triton stages
        # it in shared memory as int8, like the int8 kernel), exact in the activation dtype;
        # the tile lies in one group, so its scale applies to the tile's product per column.
        q = ((words >> shifts[:, None]) & 0xF).to(tl.int8)
        w = (q - zero[None, :]).to(a.dtype)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION) * scale[None, :]

    y = acc
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    write_result(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 m_mask[:, None] & n_mask[None, :], sum_ptr + offs_m[:, None] * N + offs_n[None, :],
                 count_ptr + tl.program_id(0), SPLIT_K)


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
    q = (words >> nibble_shift(offs_k % 8)[:, None]) & 0xF
    w = (magic_float(q) - magic_zero) * scale
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


DEQUANT_BLOCKS = dict(BLOCK_K=64, BLOCK_N=64)


def dequantize_int4_t(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, transposed: ``W^T`` as ``[K, N]`` in ``dtype`` (one pass)."""
    k, n = w.in_features, w.out_features
    out = torch.empty((k, n), dtype=dtype, device=w.qweight.device)
    grid = (cdiv(k, DEQUANT_BLOCKS["BLOCK_K"]), cdiv(n, DEQUANT_BLOCKS["BLOCK_N"]))
    _int4_dequantize_kernel[grid](w.qweight, w.scale, w.zero_point, out, n, k,
                                  GROUP_SIZE=w.group_size, **DEQUANT_BLOCKS)
    return out


def gemv_segments(config: KernelConfig, group_size: int, packed: bool) -> int:
    """Segments per GEMV K tile (rows of the tile): at least as many as the rows the thread
    layout covers (4 columns per thread, lanes along N first, then warps), so that no thread
    repeats another's work; each segment inside one group and, packed, 4+ words long."""
    lanes_n = max(1, min(32, config.block_n // 4))
    rows = config.num_warps * (32 // lanes_n)
    segments = max(rows, config.block_k // group_size, 1)
    return max(1, min(segments, config.block_k // (32 if packed else 8)))


def gemv_constexprs(config: KernelConfig, group_size: int, has_bias: bool,
                    dtype: torch.dtype, even: bool) -> dict:
    """The GEMV kernel's compile-time arguments for ``config`` (shared with ``aot.py``).

    ``PACKED``: the two-weights-per-instruction PTX path, on CUDA for 16-bit activations (the
    interpreter runs no inline PTX: it takes the plain fp32 path, which CI checks). ``EVEN``:
    every tile is in bounds (N % BLOCK_N == 0, K % (BLOCK_K * SPLIT_K) == 0), so no masks."""
    packed = (dtype in (torch.float16, torch.bfloat16) and not interpreting()
              and config.block_k % (32 * gemv_segments(config, group_size, True)) == 0)
    return dict(GROUP_SIZE=group_size, HAS_BIAS=has_bias, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                SEGMENTS=gemv_segments(config, group_size, packed), EVEN=even, PACKED=packed,
                BF16=dtype == torch.bfloat16)


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
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bias_arg, stride_b = (bias, bias.stride(0)) if bias is not None else (y, 0)
    if config.kernel == "gemv":
        if x.stride(0) % 8 or x.data_ptr() % 16:  # the packed path reads x in 16-byte rows
            x = x.clone(memory_format=torch.contiguous_format)
        even = n % config.block_n == 0 and k % (config.block_k * config.split_k) == 0
        grid = (cdiv(n, config.block_n), config.split_k, m)
        sums, counts = split_k_workspace(x.device, m * n, grid[0] * m)
        _int4_gemv_kernel[grid](
            x, w.qweight, w.scale, w.zero_point, bias_arg, y, sums, counts, n, k, x.stride(0),
            y.stride(0),
            stride_b, **gemv_constexprs(config, w.group_size, bias is not None, x.dtype, even),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    elif config.kernel == "mm":
        if w.group_size % config.block_k != 0:
            raise ValueError(f"block_k={config.block_k} must divide the group size {w.group_size}")
        grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n), config.split_k)
        sums, counts = split_k_workspace(x.device, m * n, grid[0])
        _int4_mm_kernel[grid](
            x, w.qweight, w.scale, w.zero_point, bias_arg, y, sums, counts, m, n, k, x.stride(0),
            y.stride(0),
            stride_b, **mm_constexprs(config, w.group_size, bias is not None, x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        raise ValueError(f"unknown int4 kernel {config.kernel!r}")
    return y
