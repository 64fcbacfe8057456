"""Quantization as small pure functions over tensors.

One idea covers every granularity: ``block_size``. A weight of shape ``[N, K]`` is cut into
blocks of ``block_size`` elements; each block gets one scale (and zero point).

- per tensor:  ``block_size = (N, K)``
- per channel: ``block_size = (1, K)``  (one scale per output row)
- per group:   ``block_size = (1, G)``  (one scale per G consecutive input elements of a row)
- per token:   ``block_size = (1, K)`` applied to an activation ``[M, K]``

Scales and zero points have shape ``[N // bN, K // bK]``. Every function is pure: no modules,
no state, inputs are never modified.
"""

from __future__ import annotations

import torch

# Smallest scale we ever divide by. fp16 can represent it (as a subnormal would be too coarse,
# it is a normal fp16 number), so scales stored in fp16 never flush to zero.
SCALE_EPS = 2.0**-14

# fp32 round-half-to-even trick: adding 1.5 * 2**23 pushes the fraction bits out. Used by the
# Triton kernels too, where the interpreter lacks libdevice round; here it documents the
# rounding convention (torch.round is also half-to-even).
ROUND_MAGIC = 12582912.0


def _check_blocks(shape: tuple[int, ...], block_size: tuple[int, ...]) -> None:
    if len(shape) != len(block_size):
        raise ValueError(f"block_size {block_size} must have one entry per dim of shape {shape}")
    for dim, (n, b) in enumerate(zip(shape, block_size, strict=True)):
        if b <= 0 or n % b != 0:
            raise ValueError(
                f"dim {dim} of size {n} is not divisible by block size {b}; choose a block size "
                f"that divides it (for int4 groups: a group size dividing in_features={n}) or "
                f"leave this layer unquantized"
            )


def _blocked(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """View ``[N, K]`` as ``[N//bN, bN, K//bK, bK]`` so block reductions are over dims 1 and 3."""
    _check_blocks(tuple(x.shape), block_size)
    (n, k), (bn, bk) = x.shape, block_size
    return x.reshape(n // bn, bn, k // bk, bk)


def _expand(param: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a per-block parameter ``[N//bN, K//bK]`` back to element shape ``[N, K]``."""
    bn, bk = block_size
    return param.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)


def block_amax(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    return _blocked(x.float(), block_size).abs().amax(dim=(1, 3))


def block_min_max(
    x: torch.Tensor, block_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocked(x.float(), block_size)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def choose_qparams_symmetric(
    x: torch.Tensor, block_size: tuple[int, ...], qmax: int = 127
) -> torch.Tensor:
    """Scale per block so that ``absmax`` maps to ``qmax``. All-zero blocks get ``SCALE_EPS``."""
    return (block_amax(x, block_size) / qmax).clamp(min=SCALE_EPS)


def choose_qparams_affine(
    x: torch.Tensor, block_size: tuple[int, ...], qmin: int = 0, qmax: int = 15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, integer zero point) per block covering ``[min(x, 0), max(x, 0)]``.

    Including 0 in the range keeps exact zeros exact and makes constant blocks well defined.
    """
    lo, hi = block_min_max(x, block_size)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point.to(torch.int32)


def quantize_affine(
    x: torch.Tensor,
    block_size: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` per block, cast to ``dtype``."""
    _check_blocks(tuple(x.shape), block_size)
    q = torch.round(x.float() / _expand(scale.float(), block_size))
    if zero_point is not None:
        q = q + _expand(zero_point.float(), block_size)
    return q.clamp(qmin, qmax).to(dtype)


def dequantize_affine(
    q: torch.Tensor,
    block_size: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x = (q - zero_point) * scale`` per block."""
    x = q.float()
    if zero_point is not None:
        x = x - _expand(zero_point.float(), block_size)
    return (x * _expand(scale.float(), block_size)).to(out_dtype)


def quantize_int8_symmetric(
    x: torch.Tensor, block_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 in ``[-127, 127]`` (symmetric, so -128 is never used) and its fp32 scales."""
    scale = choose_qparams_symmetric(x, block_size, 127)
    return quantize_affine(x, block_size, scale, None, -127, 127, torch.int8), scale


# Range shrink factors tried per block by ``choose_qparams_affine_mse``.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def choose_qparams_affine_mse(
    x: torch.Tensor,
    block_size: tuple[int, ...],
    qmin: int = 0,
    qmax: int = 15,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`choose_qparams_affine`, but per block keeps the shrunken range
    ``ratio * [min, max]`` whose round trip has the least squared error.

    At 4 bits one outlier stretches the step for the whole group; clipping it costs less than
    the rounding error it causes on every other element. ``ratio = 1.0`` is always a candidate,
    so the result is never worse than plain min/max.
    """
    lo, hi = block_min_max(x, block_size)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    blocks = _blocked(x.float(), block_size)
    best_err = best_scale = best_zp = None
    for ratio in ratios:
        scale = ((hi - lo) * ratio / (qmax - qmin)).clamp(min=SCALE_EPS)
        zero_point = (qmin - torch.round(lo * ratio / scale)).clamp(qmin, qmax)
        s, z = scale[:, None, :, None], zero_point[:, None, :, None]
        q = (torch.round(blocks / s) + z).clamp(qmin, qmax)
        err = ((q - z) * s - blocks).pow(2).sum(dim=(1, 3))
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zero_point
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zero_point, best_zp)
    return best_scale, best_zp.to(torch.int32)


def choose_qparams_symmetric_mse(
    x: torch.Tensor,
    block_size: tuple[int, ...],
    qmin: int = -8,
    qmax: int = 7,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> torch.Tensor:
    """Scale per block for a symmetric grid ``[qmin, qmax]`` (zero point 0) with the least squared
    round-trip error among ``absmax * ratio / qmax`` and the half-step-wider ``absmax * ratio /
    (qmax + 0.5)`` (which lets the negative side use ``qmin``)."""
    amax = block_amax(x, block_size)
    blocks = _blocked(x.float(), block_size)
    best_err = best_scale = None
    for ratio in ratios:
        for top in (qmax, qmax + 0.5):
            scale = (amax * ratio / top).clamp(min=SCALE_EPS)
            s = scale[:, None, :, None]
            err = ((torch.round(blocks / s).clamp(qmin, qmax)) * s - blocks).pow(2).sum(dim=(1, 3))
            if best_err is None:
                best_err, best_scale = err, scale
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_int4_symmetric(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit values per group: ``q`` in ``[-8, 7]`` stored unsigned as ``q + 8`` (uint8,
    unpacked, so the implied zero point is 8) and fp16-exact scales; ranges by least squared error."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(x.shape)}")
    block_size = (1, group_size)
    scale = choose_qparams_symmetric_mse(x, block_size)
    scale = scale.to(torch.float16).float().clamp(min=SCALE_EPS)
    q = quantize_affine(x, block_size, scale, None, -8, 7, torch.int16)
    return (q + 8).to(torch.uint8), scale


def quantize_int4_asymmetric(
    x: torch.Tensor, group_size: int, clip_search: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned 4-bit values in ``[0, 15]`` (uint8, unpacked), scales and zero points per group.

    ``clip_search`` picks each group's range by least squared error (see
    :func:`choose_qparams_affine_mse`) instead of plain min/max.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(x.shape)}")
    block_size = (1, group_size)
    choose = choose_qparams_affine_mse if clip_search else choose_qparams_affine
    scale, zero_point = choose(x, block_size, 0, 15)
    # Round the scale to its fp16 storage first so quantization uses the scale dequantization will.
    scale = scale.to(torch.float16).float().clamp(min=SCALE_EPS)
    q = quantize_affine(x, block_size, scale, zero_point, 0, 15, torch.uint8)
    return q, scale, zero_point.to(torch.uint8)


# Per-token int8 activations (int8_dynamic, compressed-tensors' W8A8): compressed-tensors' own
# convention, the spec of the scheme and what transformers runs (``calculate_qparams`` and
# ``forward_quantize``): ``scale = absmax / ((qmax - qmin) / 2) = absmax / 127.5``, a zero scale
# (an all-zero row) replaced by fp32's eps, ``q = round(clamp(x / scale, -128, 127))`` with
# torch.round (half to even). vLLM's int8 kernel uses ``absmax / 127`` and [-127, 127]; both put
# every value within half a step of x, so the two differ by at most one rounding step. The Triton
# kernel (autoq.kernels.triton_int8) uses these constants too.
INT8_ACT_QMIN, INT8_ACT_QMAX = -128, 127
INT8_ACT_SCALE_DIVISOR = (INT8_ACT_QMAX - INT8_ACT_QMIN) / 2  # 127.5
INT8_ACT_ZERO_SCALE = torch.finfo(torch.float32).eps  # replaces a zero scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of a 2-D activation ``[M, K]`` → (int8, fp32 scale [M, 1]),
    computed in fp32 with compressed-tensors' convention (see ``INT8_ACT_SCALE_DIVISOR``)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_ACT_SCALE_DIVISOR
    scale = torch.where(scale == 0, torch.full_like(scale, INT8_ACT_ZERO_SCALE), scale)
    # Clamping first (as compressed-tensors does) or rounding first gives the same integers.
    q = torch.round((xf / scale).clamp(INT8_ACT_QMIN, INT8_ACT_QMAX)).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[N, K]`` (K even) into bytes ``[N, K // 2]``.

    Element ``2j`` goes in the low nibble of byte ``j``, element ``2j + 1`` in the high nibble.
    """
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    if q.numel() and int(q.max()) > 15:
        raise ValueError("pack_int4 expects values in [0, 15]")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: bytes ``[N, K // 2]`` → uint8 values ``[N, K]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` when identical."""
    ref = reference.float()
    noise = (ref - approx.float()).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean().clamp(min=1e-30) / noise))


def pack_int32(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack unsigned ``num_bits`` values ``[R, C]`` into int32 words ``[R, ceil(C * bits / 32)]``.

    Value ``j`` of each run of ``32 // num_bits`` sits at bits ``num_bits * j`` of its word
    (compressed-tensors' order); the last word is padded with zeros.
    """
    per_word = 32 // num_bits
    rows, cols = values.shape
    padded = torch.nn.functional.pad(values.to(torch.uint8), (0, (-cols) % per_word))
    padded = padded.reshape(rows, -1, per_word)
    words = torch.zeros(padded.shape[:2], dtype=torch.int64, device=values.device)
    for j in range(per_word):
        words |= padded[..., j].to(torch.int64) << (num_bits * j)
    # Reinterpret the unsigned 32-bit pattern as int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[R, W]`` -> unsigned values, uint8 ``[R, cols]``."""
    mask = (1 << num_bits) - 1
    parts = [((words >> (num_bits * j)) & mask).to(torch.uint8) for j in range(32 // num_bits)]
    return torch.stack(parts, dim=-1).reshape(words.shape[0], -1)[:, :cols]


FP8_E4M3_MAX = 448.0


def quantize_fp8_e4m3(x: torch.Tensor, block_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``float8_e4m3fn`` values and fp32 scales per block, ``absmax`` mapped to 448."""
    scale = (block_amax(x.float(), block_size) / FP8_E4M3_MAX).clamp(min=SCALE_EPS**2)
    q = (x.float() / _expand(scale, block_size)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 e4m3 per row of a 2-D activation ``[M, K]`` → (fp8, fp32 scale [M, 1])."""
    return quantize_fp8_e4m3(x, (1, x.shape[-1]))
