import pytest
import torch

from autoq import primitives as P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_symmetric_round_trip_is_within_half_a_step(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 96).to(dtype)
    q, scale = P.quantize_int8_symmetric(w, (1, 96))
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    assert int(q.abs().max()) <= 127
    back = P.dequantize_affine(q, (1, 96), scale, None)
    assert (back - w.float()).abs().max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_round_trip_error_is_bounded_by_the_step(group, dtype):
    torch.manual_seed(0)
    w = torch.randn(32, 256).to(dtype)
    q, scale, zp = P.quantize_int4_asymmetric(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == zp.shape == (32, 256 // group)
    back = P.dequantize_affine(q, (1, group), scale, zp)
    # Clipping may move the range in, but never by more than a few steps.
    step = P._expand(scale, (1, group))
    assert ((back - w.float()).abs() <= 4 * step).all()
    rel = (back - w.float()).norm() / w.float().norm()
    assert rel < 0.12


def test_mse_clip_search_is_never_worse_than_min_max():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    w[0, 3] = 25.0  # an outlier
    for clip in (False, True):
        q, s, z = P.quantize_int4_asymmetric(w, 32, clip_search=clip)
        err = (P.dequantize_affine(q, (1, 32), s, z) - w).pow(2).sum()
        if not clip:
            plain = err
    assert err <= plain


def test_all_zero_rows_and_groups_give_zeros_not_nan():
    w = torch.zeros(4, 64)
    w[1, :32] = torch.randn(32)
    for quantize in (lambda t: P.quantize_int4_asymmetric(t, 32), lambda t: (*P.quantize_int8_symmetric(t, (1, 64)), None)):
        q, s, z = quantize(w)
        block = (1, 32) if z is not None else (1, 64)
        back = P.dequantize_affine(q, block, s, z)
        assert torch.isfinite(back).all() and torch.isfinite(s).all() and (s > 0).all()
        assert torch.equal(back[0], torch.zeros(64))
        assert torch.equal(back[1, 32:], torch.zeros(32))


def test_constant_rows_are_exact_or_nearly():
    w = torch.full((3, 64), 0.5)
    w[2] = -2.0
    q, s, z = P.quantize_int4_asymmetric(w, 32)
    back = P.dequantize_affine(q, (1, 32), s, z)
    assert torch.allclose(back, w, rtol=1e-3, atol=1e-3)
    q8, s8 = P.quantize_int8_symmetric(w, (1, 64))
    assert torch.allclose(P.dequantize_affine(q8, (1, 64), s8, None), w, rtol=1e-3)


def test_large_outlier_keeps_rest_of_row_usable_with_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 256) * 0.02
    w[0, 0] = 100.0
    q, s, z = P.quantize_int4_asymmetric(w, 32)
    back = P.dequantize_affine(q, (1, 32), s, z)
    # The outlier only affects its own group.
    assert (back[0, 32:] - w[0, 32:]).abs().max() < 0.02
    assert torch.isfinite(back).all()


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="not divisible by block size 128"):
        P.quantize_int4_asymmetric(torch.randn(4, 96), 128)


def test_pack_unpack_round_trip_and_layout():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = P.pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]
    assert torch.equal(P.unpack_int4(packed), q)
    rand = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(P.unpack_int4(P.pack_int4(rand)), rand)


def test_pack_rejects_odd_width_and_out_of_range():
    with pytest.raises(ValueError, match="even"):
        P.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        P.pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))


def test_per_token_int8_matches_compressed_tensors_convention():
    """absmax / 127.5, [-128, 127], half to even; a zero row gets fp32's eps as its scale."""
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.5, -127.5, 2.5]])
    q, s = P.quantize_per_token_int8(x)
    assert q[0].tolist() == [64, -127, 32]  # 63.75, -127.49999 (2 / (2 / 127.5) in fp32), 31.875
    assert torch.equal(s[0], torch.tensor([2.0]) / 127.5)
    assert q[1].tolist() == [0, 0, 0] and s[1].item() == torch.finfo(torch.float32).eps
    assert q[2].tolist() == [127, -128, 2] and s[2].item() == 1.0  # 127.5 clamps to 127


def test_per_token_int8_is_compressed_tensors_own_quantization():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    x = torch.randn(1, 6, 200, generator=torch.Generator().manual_seed(0)) * 3  # [batch, tokens, K]
    x[0, 2] = 0.0
    x[0, 3, :5] = torch.tensor([127.5, 2.5, -3.5, -0.5, -127.5])  # scale 1: ties
    x[0, 3, 5:] = 0.0
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    theirs = fake_quantize(x, scale, zero_point, args)
    q, s = P.quantize_per_token_int8(x[0])
    assert torch.equal(s, scale[0].float())
    assert torch.equal(q.float() * s, theirs[0])


def test_sqnr():
    x = torch.randn(100)
    assert P.sqnr_db(x, x) == float("inf")
    assert 15 < P.sqnr_db(x, x + 0.1 * torch.randn(100)) < 25
