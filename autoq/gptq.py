"""GPTQ (Frantar et al., 2022) as small pure functions over tensors.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the columns of a weight
``W [N, K]`` one at a time and pushes each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction error
``||X Wᵀ - X Qᵀ||²``, whose Hessian is ``H = 2/n · XᵀX`` over the calibration activations
``X [n, K]`` the layer sees. Later columns absorb the error of earlier ones, so the layer output
moves less than with independent rounding.

Groups are static and contiguous: group ``g`` covers input columns ``[g*G, (g+1)*G)`` and its
parameters (scale, zero point) are fitted on the error-updated weights when its first column is
reached. The storage layout is therefore the same as round-to-nearest (no ``g_idx``): the
result is encoded with :func:`encode_int4` / :func:`encode_int8` into exactly the tensors
:func:`autoq.primitives.quantize_int4_asymmetric` / :func:`~autoq.primitives.quantize_int8_symmetric`
return. A per-channel format is one group of ``G = K``.

A quantizer is a pair of functions:

- ``fit(w_group [N, G]) -> params``: the parameters of one group;
- ``fake_quant(w_cols [N, c], params, col_offset) -> w_hat [N, c]``: the grid values of ``c``
  consecutive columns of that group, starting ``col_offset`` columns into it.

Ready-made pairs: :func:`fit_int4` / :func:`fake_quant_int4` (autoq's int4 groups) and
:func:`fit_int8` / :func:`fake_quant_int8` (int8 symmetric per output channel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoq import primitives as P

Fit = Callable[[torch.Tensor], Any]
FakeQuant = Callable[[torch.Tensor, Any, int], torch.Tensor]

# Each Cholesky failure retries with the dampening multiplied by this factor, this many times.
DAMP_RETRY_FACTOR = 10.0
DAMP_RETRIES = 2


class DegenerateHessian(ValueError):
    """The Hessian cannot drive GPTQ (all zero, not finite, or not positive definite even after
    extra dampening). Callers fall back to round-to-nearest and note ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Hessian accumulation
# --------------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running ``H = 2/n · XᵀX`` (fp32, ``[K, K]``) over activation rows fed batch by batch.

    ``update`` keeps ``hessian`` equal to ``2/rows · Σ xᵀx`` over every row seen so far, so a
    partial accumulation is already a usable Hessian and batch sizes may differ.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.columns = columns
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any shape ``[..., K]``, flattened to ``[-1, K]``)."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected activations with {self.columns} columns, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.columns).to(self.hessian.device, torch.float32)
        n = rows.shape[0]
        if n == 0:
            return
        total = self.rows + n
        self.hessian.mul_(self.rows / total)
        self.hessian.addmm_(rows.t(), rows, alpha=2.0 / total)
        self.rows = total


def _in_features(layer: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.shape[0]
    raise TypeError(f"cannot collect a Hessian for {type(layer).__name__}; expected nn.Linear or Conv1D")


def _run_batch(model: nn.Module, batch: Any) -> None:
    """A dict batch is keyword arguments, a tuple positional arguments, anything else the one argument."""
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, tuple):
        model(*batch)
    else:
        model(batch)


def accumulate_hessians(
    model: nn.Module, batches: Iterable[Any], layers: Mapping[str, nn.Module], *, share_inputs: bool = True
) -> dict[str, HessianAccumulator]:
    """Run ``model`` on ``batches`` (under ``no_grad``) and accumulate each layer's input Hessian.

    ``layers`` maps names to ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside ``model`` (a
    ``Conv1D`` stores its weight as ``[in, out]``: quantize ``weight.T`` with its Hessian). The
    inputs each layer really receives are used, so quantizing earlier layers first and calling
    this afterwards gives the sequential (standard) GPTQ Hessians. Batches must already be on
    the model's device. The hooks are removed even when the model raises.

    With ``share_inputs``, a layer called right after another one on the very same tensor
    (q/k/v, gate/up) gets that layer's accumulator object: one ``K x K`` Hessian per distinct
    input, computed once. The sharing is decided on each layer's first call and checked on
    every later one. A layer that never ran gets an empty accumulator (zero Hessian, which
    :func:`gptq_quantize` reports as :class:`DegenerateHessian`).
    """
    accumulators: dict[str, HessianAccumulator] = {}
    shares_with: dict[str, str | None] = {}  # the layer whose input this one reuses, if any
    previous: dict[str, Any] = {"input": None, "name": None}  # the last hooked call

    def make_hook(name: str, layer: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            same_as_previous = share_inputs and previous["input"] is x
            if name not in accumulators:
                if same_as_previous:
                    shares_with[name] = previous["name"]
                    accumulators[name] = accumulators[previous["name"]]
                else:
                    shares_with[name] = None
                    accumulators[name] = HessianAccumulator(_in_features(layer), layer.weight.device)
            if shares_with[name] is None:
                accumulators[name].update(x)
            elif not (same_as_previous and previous["name"] == shares_with[name]):
                raise RuntimeError(
                    f"layer {name!r} shared the input of {shares_with[name]!r} on its first call but "
                    f"not later; call accumulate_hessians with share_inputs=False"
                )
            previous["input"], previous["name"] = x, name

        return hook

    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make_hook(name, layer), with_kwargs=True))
        with torch.no_grad():
            for batch in batches:
                _run_batch(model, batch)
                previous["input"] = previous["name"] = None
    finally:
        for handle in handles:
            handle.remove()
        previous["input"] = None
    return {
        name: accumulators.get(name) or HessianAccumulator(_in_features(layer), layer.weight.device)
        for name, layer in layers.items()
    }


# --------------------------------------------------------------------------------------------
# The GPTQ algorithm
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ needs from a Hessian, computed once and reusable across formats of one layer."""

    upper: torch.Tensor  # [K, K] upper Cholesky factor U of (H / scale + damp · I)⁻¹, Uᵀ U = that inverse
    damp: float  # dampening used, relative to the mean diagonal (larger than asked after a retry)
    scale: float  # mean diagonal of the live columns of H; H was divided by it


@dataclass
class GPTQResult:
    weight: torch.Tensor  # [N, K] fp32, exactly on the quantization grid
    params: list[Any]  # one entry per group, as returned by ``fit``
    group_size: int
    damp: float  # dampening used (larger than requested after a Cholesky retry)
    loss: float  # GPTQ's running estimate of ½ tr((W - Q) H (W - Q)ᵀ) (exact only without damping)


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp · I)⁻¹`` for a Hessian normalised to a mean
    live diagonal of 1, retrying with a larger ``damp`` when ``H + damp · I`` is not positive
    definite in floating point. Returns ``(U, damp used)``."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    used = damp
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * DAMP_RETRY_FACTOR**attempt
        lower, info = torch.linalg.cholesky_ex(hessian + used * eye)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper, used
    raise DegenerateHessian(
        f"Hessian is not positive definite even with dampening {used:g} x mean diagonal "
        f"(tried {DAMP_RETRIES + 1} dampenings from {damp:g})"
    )


def prepare_hessian(
    hessian: torch.Tensor, damp: float = 0.01, device: torch.device | str | None = None
) -> PreparedHessian:
    """Check, dampen and factor a Hessian ``[K, K]`` for :func:`gptq_quantize`.

    - dampening: ``damp · mean(diag H)`` is added to the diagonal (mean over live columns);
    - dead columns (``diag H == 0``: the input is always zero there) get a unit diagonal. Their
      row and column of ``H`` are zero, so GPTQ rounds them to nearest and passes no error on.
      Unlike the reference implementation their weights are kept, not zeroed, so inputs that
      are non-zero there after calibration still see the original weight up to rounding.

    Raises :class:`DegenerateHessian` when ``H`` is all zero, not finite, has a non-positive
    diagonal mean, or is not positive definite after ``DAMP_RETRIES`` larger dampenings.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"expected a square Hessian [K, K], got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(device or hessian.device, torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        raise DegenerateHessian("Hessian has non-finite entries")
    dead = torch.diagonal(h) == 0
    if bool(dead.all()):
        raise DegenerateHessian("Hessian is zero: the layer saw only zero inputs (or never ran)")
    # GPTQ does not change when H is scaled; normalising the mean live diagonal to 1 keeps the
    # Cholesky well scaled and makes ``damp`` the relative dampening λ = damp · mean(diag H).
    scale = float(torch.diagonal(h)[~dead].mean())
    if scale <= 0:
        raise DegenerateHessian("Hessian has a non-positive mean diagonal; it is not XᵀX of any inputs")
    h = h / scale
    h[dead, :] = 0.0  # already zero for any XᵀX; enforced so dead columns are truly decoupled
    h[:, dead] = 0.0
    torch.diagonal(h)[dead] = 1.0
    upper, used = _upper_inverse_cholesky(h, damp)
    return PreparedHessian(upper, used, scale)


def _block_bounds(columns: int, group_size: int, block_size: int) -> list[tuple[int, int]]:
    """Column blocks ``[start, end)`` for the lazy updates, laid out so that every group either
    lies inside one block or starts at a block start. At a block start all remaining columns
    hold their error-updated values, so a group's parameters are always fitted on fully
    updated weights."""
    if group_size <= block_size:
        step = (block_size // group_size) * group_size
        return [(s, min(s + step, columns)) for s in range(0, columns, step)]
    bounds = []
    for g0 in range(0, columns, group_size):
        g1 = g0 + group_size
        bounds += [(s, min(s + block_size, g1)) for s in range(g0, g1, block_size)]
    return bounds


def _check_shapes(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, group_size: int, block_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    h_shape = tuple((hessian.upper if isinstance(hessian, PreparedHessian) else hessian).shape)
    if h_shape != (k, k):
        raise ValueError(f"Hessian shape {h_shape} does not match in_features={k}")
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide in_features={k}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


def _gptq_core(
    w: torch.Tensor, upper: torch.Tensor, group_size: int, fit: Fit, fake_quant: FakeQuant, block_size: int
) -> tuple[torch.Tensor, list[Any], torch.Tensor]:
    """GPTQ on ``L`` layers at once: ``w [L, N, K]`` fp32 (updated in place), ``upper [L, K, K]``.

    ``fit`` and ``fake_quant`` see the ``L · N`` rows stacked as one ``[L · N, c]`` matrix.
    Returns ``(q [L, N, K], params per group over the stacked rows, loss [L] in units of the
    normalised H)``.
    """
    n_layers, n, k = w.shape
    q = torch.empty_like(w)
    params: list[Any] = [None] * (k // group_size)
    loss = torch.zeros(n_layers, dtype=torch.float32, device=w.device)

    for b0, b1 in _block_bounds(k, group_size, block_size):
        w_block = w[:, :, b0:b1].clone()
        q_block = torch.empty_like(w_block)
        u_block = upper[:, b0:b1, b0:b1]
        u_diag = torch.diagonal(u_block, dim1=1, dim2=2)  # [L, bs]
        u_rows = u_block / u_diag[:, :, None]  # row i of U divided by U_ii
        for i in range(b1 - b0):
            col = b0 + i
            group, offset = divmod(col, group_size)
            if offset == 0:
                g_end = col + group_size
                # Inside the block the updated values live in w_block; a group reaching past
                # the block starts at the block start, where w is fully updated.
                source = w_block[:, :, i:i + group_size] if g_end <= b1 else w[:, :, col:g_end]
                params[group] = fit(source.reshape(n_layers * n, group_size))
            column = w_block[:, :, i:i + 1]
            column_q = fake_quant(column.reshape(n_layers * n, 1), params[group], offset).reshape(n_layers, n, 1)
            q_block[:, :, i:i + 1] = column_q
            # Error feedback: w_j -= (w_i - q_i) · U_ij / U_ii for the later columns j > i.
            # Column i itself is final from here on; it is kept to compute the block error.
            w_block[:, :, i + 1:].baddbmm_(column - column_q, u_rows[:, i:i + 1, i + 1:], alpha=-1.0)
        err_block = (w_block - q_block) / u_diag[:, None, :]
        q[:, :, b0:b1] = q_block
        w[:, :, b1:].baddbmm_(err_block, upper[:, b0:b1, b1:], alpha=-1.0)
        loss += err_block.pow(2).sum(dim=(1, 2)) / 2
    return q, params, loss


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    group_size: int,
    fit: Fit,
    fake_quant: FakeQuant,
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> GPTQResult:
    """Quantize ``weight [N, K]`` with GPTQ against ``hessian [K, K]`` in static groups of
    ``group_size`` input columns (``K`` for one scale per output channel).

    ``hessian`` is a raw ``H`` (prepared here with ``damp``, see :func:`prepare_hessian`) or a
    :class:`PreparedHessian` (``damp`` is then ignored), which saves the two Cholesky
    factorisations when one layer is quantized to several formats.

    Columns are quantized in order. Inside a block of ``block_size`` columns each column's
    error is fed to the later columns of the block at once; the block's accumulated error
    reaches the columns after it in one matrix product (the lazy batch update). Group ``g``'s
    parameters are fitted when column ``g · group_size`` is reached, on the updated weights.

    Rows are independent given ``H``: layers fed the same input (q/k/v) can be quantized in one
    call on their stacked weights and split afterwards, with the same result.

    Raises :class:`DegenerateHessian` (see :func:`prepare_hessian`) and ``ValueError`` for
    inconsistent shapes.
    """
    _check_shapes(weight, hessian, group_size, block_size)
    if not isinstance(hessian, PreparedHessian):
        hessian = prepare_hessian(hessian, damp, weight.device)
    w = weight.detach().to(torch.float32).clone().unsqueeze(0)
    upper = hessian.upper.to(weight.device).unsqueeze(0)
    q, params, loss = _gptq_core(w, upper, group_size, fit, fake_quant, block_size)
    return GPTQResult(q[0], params, group_size, hessian.damp, float(loss[0]) * hessian.scale)


def _split_rows(params: Any, n_layers: int, rows: int) -> list[Any]:
    """Split params fitted on ``n_layers`` stacked weights back into one per layer."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(
            f"gptq_quantize_many needs params that are dataclasses of per-row tensors (like "
            f"Int4GroupParams), got {type(params).__name__}"
        )
    chunks = {f.name: getattr(params, f.name).split(rows) for f in dataclasses.fields(params)}
    return [type(params)(**{name: parts[i] for name, parts in chunks.items()}) for i in range(n_layers)]


def gptq_quantize_many(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor | PreparedHessian],
    group_size: int,
    fit: Fit,
    fake_quant: FakeQuant,
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> list[GPTQResult]:
    """:func:`gptq_quantize` for several layers of one shape (each with its own Hessian) in a
    single column loop, batched over the layers: the same results up to floating-point
    rounding, several times faster when the layers are small (the loop runs once instead of
    once per layer). ``fit`` must return a dataclass of tensors with one row per weight row
    (like :class:`Int4GroupParams`), so the params can be split per layer.

    Prepare the Hessians first (:func:`prepare_hessian`) to handle a :class:`DegenerateHessian`
    per layer; a raw degenerate one raises for the whole call.
    """
    if len(weights) != len(hessians) or not weights:
        raise ValueError(f"need one Hessian per weight, got {len(weights)} weights and {len(hessians)} Hessians")
    shape = tuple(weights[0].shape)
    for weight, hessian in zip(weights, hessians, strict=True):
        if tuple(weight.shape) != shape:
            raise ValueError(f"all weights must have one shape; got {shape} and {tuple(weight.shape)}")
        _check_shapes(weight, hessian, group_size, block_size)
    device = weights[0].device
    prepared = [h if isinstance(h, PreparedHessian) else prepare_hessian(h, damp, device) for h in hessians]
    w = torch.stack([weight.detach().to(device, torch.float32) for weight in weights])
    upper = torch.stack([h.upper.to(device) for h in prepared])
    q, params, loss = _gptq_core(w, upper, group_size, fit, fake_quant, block_size)
    per_layer = [_split_rows(p, len(weights), shape[0]) for p in params]
    return [
        GPTQResult(q[i], [p[i] for p in per_layer], group_size, h.damp, float(loss[i]) * h.scale)
        for i, h in enumerate(prepared)
    ]


# --------------------------------------------------------------------------------------------
# Quantizers matching autoq's formats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4GroupParams:
    scale: torch.Tensor  # [N, 1] fp32, already rounded to its fp16 storage
    zero_point: torch.Tensor  # [N, 1] int32 in [0, 15]
    low: torch.Tensor  # [N, 1] fp32 -zero_point: lowest code minus the zero point
    high: torch.Tensor  # [N, 1] fp32 15 - zero_point: highest code minus the zero point


@dataclass(frozen=True)
class Int8ChannelParams:
    scale: torch.Tensor  # [N, 1] fp32


def fit_int4(w_group: torch.Tensor, clip_search: bool = True) -> Int4GroupParams:
    """Parameters of one int4 group ``[N, G]``, as :func:`autoq.primitives.quantize_int4_asymmetric`
    chooses them: per-row least-squares clip search (or plain min/max), scale rounded to fp16."""
    g = w_group.shape[1]
    choose = P.choose_qparams_affine_mse if clip_search else P.choose_qparams_affine
    scale, zero_point = choose(w_group.float(), (1, g), 0, 15)
    scale = scale.to(torch.float16).float().clamp(min=P.SCALE_EPS)
    zp = zero_point.float()
    return Int4GroupParams(scale, zero_point, -zp, 15.0 - zp)


def fake_quant_int4(w_cols: torch.Tensor, params: Int4GroupParams, col_offset: int = 0) -> torch.Tensor:
    """``(clamp(round(w / s) + zp, 0, 15) - zp) · s``, computed as
    ``clamp(round(w / s), -zp, 15 - zp) · s`` (equal: the values are small integers), the same
    result as ``primitives.quantize_affine`` followed by ``primitives.dequantize_affine``."""
    return torch.round(w_cols.float() / params.scale).clamp_(params.low, params.high).mul_(params.scale)


def fit_int8(w_rows: torch.Tensor) -> Int8ChannelParams:
    """Per-output-channel symmetric scale ``absmax / 127``, as :func:`autoq.primitives.quantize_int8_symmetric`."""
    return Int8ChannelParams(P.choose_qparams_symmetric(w_rows.float(), (1, w_rows.shape[1]), 127))


def fake_quant_int8(w_cols: torch.Tensor, params: Int8ChannelParams, col_offset: int = 0) -> torch.Tensor:
    return torch.round(w_cols.float() / params.scale).clamp_(-127, 127).mul_(params.scale)


def encode_int4(
    w_hat: torch.Tensor, params: list[Int4GroupParams]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of a GPTQ int4 result: ``(q uint8 [N, K] in [0, 15], scale fp32 [N, K/G]
    (fp16-exact), zero_point uint8 [N, K/G])``, the tensors ``quantize_int4_asymmetric`` returns.

    ``w_hat = (q - zp) · s`` with ``s`` an fp16 value and ``|q - zp| <= 15`` is exact in fp32, so
    ``round(w_hat / s) + zp`` recovers ``q`` exactly and dequantizing gives back ``w_hat``.
    """
    scale = torch.cat([p.scale for p in params], dim=1)
    zero_point = torch.cat([p.zero_point for p in params], dim=1)
    group_size = w_hat.shape[1] // len(params)
    q = P.quantize_affine(w_hat, (1, group_size), scale, zero_point, 0, 15, torch.uint8)
    return q, scale, zero_point.to(torch.uint8)


def encode_int8(w_hat: torch.Tensor, params: list[Int8ChannelParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of a GPTQ int8 result, one ``Int8ChannelParams`` per group of columns (one
    for per channel): ``(q int8 [N, K], scale fp32 [N, groups])``, the tensors
    ``quantize_int8_symmetric(w, (1, K // groups))`` returns."""
    if not params or w_hat.shape[1] % len(params):
        raise ValueError(f"{len(params)} int8 groups do not split {w_hat.shape[1]} columns evenly")
    scale = torch.cat([p.scale for p in params], dim=1)
    q = P.quantize_affine(w_hat, (1, w_hat.shape[1] // len(params)), scale, None, -127, 127, torch.int8)
    return q, scale


def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, clip_search: bool = True,
    block_size: int = 128, damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for autoq's int4 groups → ``(q, scale, zero_point)`` in the round-to-nearest layout."""
    result = gptq_quantize(
        weight, hessian, group_size, lambda w: fit_int4(w, clip_search), fake_quant_int4,
        block_size=block_size, damp=damp,
    )
    return encode_int4(result.weight, result.params)


def gptq_int8(
    weight: torch.Tensor, hessian: torch.Tensor, *, block_size: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for int8 symmetric per output channel → ``(q, scale)`` in the round-to-nearest layout."""
    result = gptq_quantize(
        weight, hessian, weight.shape[1], fit_int8, fake_quant_int8, block_size=block_size, damp=damp,
    )
    return encode_int8(result.weight, result.params)
