"""GPTQ core (autoq.gptq): Hessian accumulation, the algorithm, and the int4 / int8 quantizers."""

import pytest
import torch
from torch import nn

from autoq import gptq
from autoq import primitives as P

N, K = 64, 256


def correlated_inputs(rows: int = 1024, columns: int = K, seed: int = 0) -> torch.Tensor:
    """Activations whose columns are strongly correlated, so H is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=gen) / columns**0.5 + torch.eye(columns)
    return torch.randn(rows, columns, generator=gen) @ mix


def random_weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


def rtn_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    q, scale, zero_point = P.quantize_int4_asymmetric(w, group_size)
    return P.dequantize_affine(q, (1, group_size), scale, zero_point)


def rtn_int8(w: torch.Tensor) -> torch.Tensor:
    q, scale = P.quantize_int8_symmetric(w, (1, w.shape[1]))
    return P.dequantize_affine(q, (1, w.shape[1]), scale, None)


def run_int4(w, h, group_size, **kwargs) -> gptq.GPTQResult:
    return gptq.gptq_quantize(w, h, group_size, gptq.fit_int4, gptq.fake_quant_int4, **kwargs)


def run_int8(w, h, **kwargs) -> gptq.GPTQResult:
    return gptq.gptq_quantize(w, h, w.shape[1], gptq.fit_int8, gptq.fake_quant_int8, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # GPTQ's column loop is many small ops; on a shared 2-core machine extra threads only spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hessian() -> torch.Tensor:
    x = correlated_inputs()
    return 2.0 / x.shape[0] * x.T @ x


# ---- Hessian accumulation -----------------------------------------------------------------


def test_accumulator_matches_direct_hessian():
    x = correlated_inputs(rows=700, columns=32)
    acc = gptq.HessianAccumulator(32)
    for chunk in (x[:1], x[1:300], x[300:300], x[300:].reshape(4, 100, 32)):  # uneven, empty, 3-D
        acc.update(chunk)
    assert acc.rows == 700
    torch.testing.assert_close(acc.hessian, 2.0 / 700 * x.T @ x, rtol=1e-5, atol=1e-5)


def test_accumulator_rejects_wrong_width():
    with pytest.raises(ValueError, match="columns"):
        gptq.HessianAccumulator(8).update(torch.zeros(3, 9))


def test_accumulate_hessians_sees_layer_inputs_and_removes_hooks():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    first, conv, last = nn.Linear(16, 24), Conv1D(8, 24), nn.Linear(8, 4)  # Conv1D(nf=out, nx=in)
    model = nn.Sequential(first, nn.ReLU(), conv, last)
    batches = [torch.randn(2, 5, 16), torch.randn(3, 5, 16)]
    accs = gptq.accumulate_hessians(model, batches, {"first": first, "conv": conv, "last": last})

    x = torch.cat([b.reshape(-1, 16) for b in batches])
    with torch.no_grad():
        conv_in = torch.relu(first(x))
        last_in = conv(conv_in)
    for name, inputs in (("first", x), ("conv", conv_in), ("last", last_in)):
        assert accs[name].rows == 25
        torch.testing.assert_close(accs[name].hessian, 2.0 / 25 * inputs.T @ inputs, rtol=1e-4, atol=1e-5)
    assert all(not m._forward_pre_hooks for m in model.modules())


class Attention(nn.Module):
    """q/k/v read one tensor; ``unused`` never runs."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o, self.unused = (nn.Linear(8, 8) for _ in range(5))

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


def test_accumulate_hessians_shares_one_accumulator_per_distinct_input():
    torch.manual_seed(0)
    model = Attention()
    layers = dict(model.named_children())
    batches = [torch.randn(3, 8), torch.randn(5, 8)]
    shared = gptq.accumulate_hessians(model, batches, layers)
    assert shared["q"] is shared["k"] is shared["v"] and shared["o"] is not shared["q"]
    x = torch.cat(batches)
    torch.testing.assert_close(shared["q"].hessian, 2.0 / 8 * x.T @ x)
    assert shared["q"].rows == 8 and shared["unused"].rows == 0

    separate = gptq.accumulate_hessians(model, batches, layers, share_inputs=False)
    assert separate["q"] is not separate["k"]
    for name in layers:
        torch.testing.assert_close(separate[name].hessian, shared[name].hessian)
    with pytest.raises(gptq.DegenerateHessian, match="never ran"):
        run_int8(model.unused.weight, shared["unused"].hessian)


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_accumulate_hessians_removes_hooks_when_the_model_raises():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"):
        gptq.accumulate_hessians(nn.Sequential(layer, Boom()), [torch.zeros(2, 4)], {"layer": layer})
    assert not layer._forward_pre_hooks


# ---- the algorithm --------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_int4_beats_rtn_on_correlated_hessian(hessian, group_size):
    w = random_weight()
    result = run_int4(w, hessian, group_size)
    rtn, ours = output_error(w, rtn_int4(w, group_size), hessian), output_error(w, result.weight, hessian)
    assert ours < 0.8 * rtn, f"GPTQ {ours:.1f} vs RTN {rtn:.1f}"


def test_gptq_int8_beats_rtn_on_correlated_hessian(hessian):
    w = random_weight()
    rtn, ours = output_error(w, rtn_int8(w), hessian), output_error(w, run_int8(w, hessian).weight, hessian)
    assert ours < 0.8 * rtn, f"GPTQ {ours:.4f} vs RTN {rtn:.4f}"


@pytest.mark.parametrize("group_size", [32, 128])
def test_identity_hessian_is_round_to_nearest_int4(group_size):
    # With H = I the inverse Hessian is diagonal: no error reaches other columns, and each
    # group is fitted on its original weights, so GPTQ is exactly round-to-nearest.
    w = random_weight()
    torch.testing.assert_close(run_int4(w, torch.eye(K), group_size).weight, rtn_int4(w, group_size), rtol=0, atol=0)


def test_identity_hessian_is_round_to_nearest_without_clip_search():
    w = random_weight()
    q, scale, zero_point = P.quantize_int4_asymmetric(w, 32, clip_search=False)
    rtn = P.dequantize_affine(q, (1, 32), scale, zero_point)
    ours = gptq.gptq_quantize(w, torch.eye(K), 32, lambda g: gptq.fit_int4(g, clip_search=False), gptq.fake_quant_int4)
    torch.testing.assert_close(ours.weight, rtn, rtol=0, atol=0)


def test_identity_hessian_is_round_to_nearest_int8():
    w = random_weight()
    torch.testing.assert_close(run_int8(w, torch.eye(K)).weight, rtn_int8(w), rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [16, 48, 256])
def test_block_size_only_changes_the_schedule(hessian, block_size):
    # Lazy batch updates are exact algebra, so the block size changes results only through
    # floating-point rounding (which can flip an occasional tie). Covers groups larger than a
    # block (16), blocks not a multiple of the group (48 -> 32) and one block (256).
    w = random_weight()
    reference = output_error(w, run_int4(w, hessian, 32).weight, hessian)
    other = output_error(w, run_int4(w, hessian, 32, block_size=block_size).weight, hessian)
    assert other == pytest.approx(reference, rel=0.02)


def test_loss_estimate_tracks_output_error(hessian):
    w = random_weight()
    result = run_int4(w, hessian, 128, damp=1e-6)
    assert result.loss == pytest.approx(output_error(w, result.weight, hessian) / 2, rel=0.02)


def test_dead_columns_are_rounded_to_nearest_and_pass_no_error(hessian):
    w = random_weight()
    h = hessian.clone()
    dead = torch.tensor([3, 40, 200])
    h[dead, :] = 0
    h[:, dead] = 0
    result = run_int8(w, h)
    assert torch.isfinite(result.weight).all()
    torch.testing.assert_close(result.weight[:, dead], rtn_int8(w)[:, dead], rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [32, K])
def test_many_layers_at_once_match_one_at_a_time(group_size):
    fit, fake_quant = (gptq.fit_int4, gptq.fake_quant_int4) if group_size < K else (gptq.fit_int8, gptq.fake_quant_int8)
    weights = [random_weight(seed) for seed in range(3)]
    hessians = []
    for seed in range(3):
        x = correlated_inputs(rows=512, seed=10 + seed)
        hessians.append(gptq.prepare_hessian(2.0 / 512 * x.T @ x))
    together = gptq.gptq_quantize_many(weights, hessians, group_size, fit, fake_quant)
    for w, h, result in zip(weights, hessians, together, strict=True):
        alone = gptq.gptq_quantize(w, h, group_size, fit, fake_quant)
        # Batched matmuls may round differently, which can flip a rare tie; compare the error.
        h_full = torch.linalg.inv(h.upper.T @ h.upper)  # the damped, normalised H
        assert output_error(w, result.weight, h_full) == pytest.approx(output_error(w, alone.weight, h_full), rel=0.01)
        assert result.loss == pytest.approx(alone.loss, rel=0.01)
        assert len(result.params) == K // group_size and result.params[0].scale.shape == (N, 1)
        encoded = gptq.encode_int4(result.weight, result.params) if group_size < K else gptq.encode_int8(result.weight, result.params)
        assert encoded[0].shape == (N, K)


# ---- codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_codes_are_valid_and_decode_to_w_hat(hessian, group_size):
    w = random_weight() * 0.02
    result = run_int4(w, hessian, group_size)
    q, scale, zero_point = gptq.encode_int4(result.weight, result.params)
    assert q.dtype == torch.uint8 and q.shape == (N, K) and int(q.max()) <= 15
    assert zero_point.dtype == torch.uint8 and zero_point.shape == (N, K // group_size) and int(zero_point.max()) <= 15
    assert scale.shape == (N, K // group_size)
    torch.testing.assert_close(scale.to(torch.float16).float(), scale, rtol=0, atol=0)  # fp16-exact
    decoded = P.dequantize_affine(P.unpack_int4(P.pack_int4(q)), (1, group_size), scale.to(torch.float16), zero_point)
    torch.testing.assert_close(decoded, result.weight, rtol=0, atol=0)

    # Same layout as round-to-nearest, through the one-call helper too.
    rq, rs, rz = P.quantize_int4_asymmetric(w, group_size)
    for ours, theirs in zip(gptq.gptq_int4(w, hessian, group_size), (rq, rs, rz), strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape


def test_int8_codes_are_valid_and_decode_to_w_hat(hessian):
    w = random_weight()
    result = run_int8(w, hessian)
    q, scale = gptq.encode_int8(result.weight, result.params)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    rq, rs = P.quantize_int8_symmetric(w, (1, K))
    assert scale.shape == rs.shape and scale.dtype == rs.dtype
    torch.testing.assert_close(P.dequantize_affine(q, (1, K), scale, None), result.weight, rtol=0, atol=0)
    torch.testing.assert_close(gptq.gptq_int8(w, hessian)[0], q, rtol=0, atol=0)


def test_int8_groups_grid_codes_decode_to_w_hat_and_beat_rtn(hessian):
    """int8_g128's GPTQ grid (int8 per channel's fit, one group per 128 columns): codes in
    [-127, 127], one fp32 scale per group, decoding to GPTQ's weight, and less output error than
    round-to-nearest in the same layout."""
    from autoq import formats

    fmt = formats.get("int8_g128")
    grid = fmt.gptq_grid(N, K)
    w = random_weight()
    result = gptq.gptq_quantize(w, hessian, grid.group_size, grid.fit, grid.fake_quant)
    weight = grid.encode(result.weight, result.params)
    assert weight.qweight.dtype == torch.int8 and int(weight.qweight.abs().max()) <= 127
    assert weight.scale.shape == (N, K // 128) and weight.scale.dtype == torch.float32
    torch.testing.assert_close(fmt.dequantize(weight), result.weight, rtol=0, atol=0)
    rtn = fmt.dequantize(fmt.quantize(w))
    assert output_error(w, result.weight, hessian) < 0.8 * output_error(w, rtn, hessian)


# ---- degenerate input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: torch.zeros(K, K), "zero"),
        (lambda: torch.full((K, K), float("nan")), "non-finite"),
        (lambda: -torch.eye(K), "non-positive"),
        (lambda: torch.eye(K) + 10 * torch.ones(K, K).triu(1) + 10 * torch.ones(K, K).tril(-1), "positive definite"),
    ],
    ids=["zero", "nan", "negative", "indefinite"],
)
def test_degenerate_hessian_raises(make, reason):
    with pytest.raises(gptq.DegenerateHessian, match=reason) as info:
        run_int4(random_weight(), make(), 32)
    assert reason in info.value.reason


def test_bad_shapes_raise_value_error(hessian):
    with pytest.raises(ValueError, match="does not divide"):
        run_int4(random_weight(), hessian, 48)
    with pytest.raises(ValueError, match="Hessian shape"):
        run_int4(random_weight(), hessian[:8, :8], 32)
