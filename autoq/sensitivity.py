"""Sensitivity: how much the model's output suffers when one layer alone is quantized.

For layer ``l`` and format ``f``, with ``Y_l`` the layer's float output on a scoring batch and
``Y_l^f`` the output of the real quantized module (``quantize_layer``) on the same recorded input
``X_l``, the perturbation is ``ΔY = Y_l^f - Y_l``. First order: the gradients are taken at the
unquantized model, so one backward pass gives ``∂L/∂Y_l`` for every layer at once, and each layer
is scored as if perturbed alone.

Which ``L``:

- ``loss_fn(output, batch)`` when given, or the model's own loss when the batch carries
  ``labels``: ``S(l, f) = Σ (∂L/∂Y_l ⊙ ΔY)²`` summed over elements and scoring batches (the
  diagonal-Fisher score ModelOpt's auto_quantize uses).
- otherwise random probes. An output-matching loss such as ``||out - out_float||²`` has a zero
  gradient at the unquantized model, so it says nothing to first order. Instead, for Gaussian
  ``r`` (one per probe, ``PROBES`` = 8 by default) the projection ``L_r = r · out`` has
  ``∂L_r/∂Y_l = J_lᵀ r`` (``J_l`` the Jacobian of the output with respect to ``Y_l``), so
  ``E_r[(∂L_r/∂Y_l · ΔY)²] = ||J_l ΔY||²``: the squared output damage of the perturbation,
  linearised. The score is the mean over probes of ``(g_r · ΔY)²`` — the *squared dot product*,
  taken per sample (samples of a batch do not interact, so cross-sample terms only add noise) —
  summed over samples and batches. ``out`` is the model's ``logits`` or ``last_hidden_state`` (else
  its first tensor); when the batch has an ``attention_mask`` of matching shape, padded positions
  get a zero probe so padding never counts.

Measured on all-MiniLM-L6-v2 (int4_g128, 16 calibration sentences, Spearman rank correlation
against the embedding damage of quantizing each layer alone, on other sentences): per-sample
squared dot product 0.947, one dot product over the whole batch 0.925, the elementwise square of
the same probe gradients 0.948, plain weight error 0.34. The dot product is kept because it is
the unbiased estimate of ``||J_l ΔY||²``; with the 64 bundled sentences it reaches 0.98
(``bench/results/search-cpu.md``).

Memory, per scoring batch: every layer's input ``X_l`` and its gradient under each probe are
held (so about ``(1 + probes)`` times the batch's linear-layer activations; model parameters are
frozen during the pass, so no weight gradients exist); perturbed outputs are computed one layer
and one format at a time. Hugging Face models' repeated blocks run with activation checkpointing
(non-reentrant; recomputed in each backward), so the autograd graph does not keep their internal
activations (eager attention probabilities, MLP intermediates) for all blocks at once; this costs
about 20 % more scoring time on MiniLM and leaves the scores unchanged. Each layer's quantized
modules are built once and kept for the stage. Fewer probes or shorter scoring batches lower the
peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from autoq.calibration import Batch, run_batch, to_device
from autoq.formats import UNQUANTIZED
from autoq.profile import eval_mode, model_device
from autoq.swap import LayerQuantizer, QuantizedMemo, quantized_copy, swapped

Report = Callable[[float, str], None]
LossFn = Callable[[object, Batch], torch.Tensor]

PROBES = 8


def output_tensor(output) -> torch.Tensor:
    """The tensor a model's output is judged by: logits, last hidden state or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    values = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(values, list | tuple):
        for value in values:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}; pass loss_fn=")


def output_mask(out: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """``attention_mask`` broadcastable to ``out`` when the batch has one of matching shape."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask = batch["attention_mask"]
        if out.dim() >= mask.dim() and tuple(out.shape[:mask.dim()]) == tuple(mask.shape):
            return mask.to(out.dtype).reshape(*mask.shape, *([1] * (out.dim() - mask.dim())))
    return None


def model_loss(output, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor | None:
    """The scalar loss to score with, or ``None`` when random probes should be used."""
    if loss_fn is not None:
        return loss_fn(output, batch)
    if isinstance(batch, dict) and "labels" in batch:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
    return None


class _FrozenParameters:
    """Turn off ``requires_grad`` on every parameter for the duration, then restore it."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags, strict=True):
            p.requires_grad_(flag)


@contextmanager
def _checkpointed_blocks(model: nn.Module, enable: bool):
    """Activation checkpointing of a Hugging Face model's repeated blocks for one scoring pass.

    transformers checkpoints a ``GradientCheckpointingLayer`` only when its own ``training``
    flag is set, so that flag is set on the blocks alone (their dropout and attention modules
    stay in eval mode), with non-reentrant ``torch.utils.checkpoint``; everything is restored
    afterwards. Models without such blocks run unchanged.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        GradientCheckpointingLayer = ()
    blocks = [m for m in model.modules() if enable and GradientCheckpointingLayer
              and isinstance(m, GradientCheckpointingLayer)]
    saved = [(m, m.training, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
             for m in blocks]
    try:
        for m in blocks:
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
            m.training = True
        yield
    finally:
        for m, training, flag, func in saved:
            m.training, m.gradient_checkpointing = training, flag
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


def _per_sample_dot(g: torch.Tensor, dy: torch.Tensor, batch_size: int) -> torch.Tensor:
    prod = (g.float() * dy.float())
    if prod.dim() >= 2 and prod.shape[0] == batch_size:
        return prod.reshape(batch_size, -1).sum(dim=1)
    return prod.sum().reshape(1)


def probe_seed(seed: int, batch_index: int) -> int:
    """The seed of calibration batch ``batch_index``'s random probes: each batch has its own, so a
    batch's score does not depend on which batches ran before it (or on which worker)."""
    return (seed * 1_000_003 + batch_index) % 2**63


def output_gradients(output, batch: Batch, tensors: list[torch.Tensor], loss_fn: LossFn | None, probes: int,
                     seed: int) -> tuple[list, int]:
    """``(grads, batch_size)``: the gradient of the loss (one entry, ``batch_size`` 0: elementwise
    score) or of each random output probe (``probes`` entries; ``batch_size`` for the per-sample
    score) with respect to ``tensors``. ``seed``: the batch's :func:`probe_seed`; the probes are
    drawn on the output's own device (the last one of a model spread over several)."""
    loss = model_loss(output, batch, loss_fn)
    if loss is not None:
        return [torch.autograd.grad(loss, tensors, allow_unused=True)], 0
    out = output_tensor(output)
    mask = output_mask(out, batch)
    generator = torch.Generator(device=out.device).manual_seed(seed)
    grads = []
    for p in range(probes):
        r = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        if mask is not None:
            r = r * mask
        grads.append(torch.autograd.grad((r * out).sum(), tensors, allow_unused=True, retain_graph=p < probes - 1))
    return grads, out.shape[0] if out.dim() >= 2 else 1


def _record_gradients(model: nn.Module, batch: Batch, layers: dict[str, nn.Module], loss_fn: LossFn | None,
                      probes: int, seed: int, checkpointing: bool = True):
    """One forward with every layer's input and output recorded, then the backward pass(es).

    Returns ``(calls, grads, batch_size)``: ``calls`` lists ``(layer, input, float output)`` per
    layer call; ``grads[p][j]`` is the gradient for call ``j`` under probe ``p`` (one entry
    when a real loss is used); ``batch_size`` is 0 for a real loss (elementwise score).
    """
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    recording = [True]  # off once the forward is done: checkpointed blocks rerun it in backward

    def make_hook(name: str):
        def hook(module, args, output):
            if not output.requires_grad:  # nothing upstream needs a gradient: start the graph here
                output = output.detach().requires_grad_(True)
            if recording[0]:
                calls.append((name, args[0].detach(), output))
            return output
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), _FrozenParameters(model), torch.enable_grad(), \
                _checkpointed_blocks(model, checkpointing):
            output = run_batch(model, batch)
            recording[0] = False
            grads, batch_size = output_gradients(output, batch, [y for _, _, y in calls], loss_fn, probes, seed)
    finally:
        for h in handles:
            h.remove()
    return [(name, x, y.detach()) for name, x, y in calls], grads, batch_size


def _layer_format_score(qmodule: nn.Module, calls: list, mine: list[int], grads: list, batch_size: int) -> float:
    """This batch's S for one layer and format: one perturbed output at a time."""
    total = 0.0
    for j in mine:
        _, x, y = calls[j]
        with torch.no_grad():
            dy = qmodule(x).float() - y.float()
            for probe_grads in grads:
                g = probe_grads[j]
                if g is None:  # the output does not depend on this call
                    continue
                if batch_size:  # random probes: squared dot product per sample
                    total += float(_per_sample_dot(g, dy, batch_size).pow(2).sum()) / len(grads)
                else:  # a real loss: elementwise (diagonal Fisher)
                    total += float((g.float() * dy).pow(2).sum())
        del dy
    return total


def score(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: dict[str, nn.Module],
    candidates: Mapping[str, Sequence[str]],
    *,
    loss_fn: LossFn | None = None,
    probes: int = PROBES,
    seed: int = 0,
    checkpointing: bool = True,
    report: Report | None = None,
    quantized: QuantizedMemo | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """``({layer: {format: S}}, {layer: {format: reason}})``: the score of every candidate format
    of every layer (``none`` scores 0), and the formats dropped because running them on the
    recorded inputs raised or gave a non-finite score."""
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    device = model_device(model)
    scores = {name: {fmt: 0.0 for fmt in candidates[name]} for name in layers}
    dropped: dict[str, dict[str, str]] = {name: {} for name in layers}
    quantized = LayerQuantizer() if quantized is None else quantized
    total = len(batches) * max(len(layers), 1)

    for b, batch in enumerate(batches):
        calls, grads, batch_size = _record_gradients(model, to_device(batch, device), layers, loss_fn,
                                                     probes, probe_seed(seed, b), checkpointing)
        for li, (name, module) in enumerate(layers.items()):
            mine = [j for j, call in enumerate(calls) if call[0] == name]
            for fmt in candidates[name]:
                if fmt == UNQUANTIZED or fmt in dropped[name]:
                    continue
                try:
                    qmodule = quantized_copy(module, fmt, name, quantized)
                    s = _layer_format_score(qmodule, calls, mine, grads, batch_size)
                except Exception as err:  # a kernel failing on these inputs drops the format
                    dropped[name][fmt] = f"raised {type(err).__name__} while scoring: {err}"
                    continue
                if not math.isfinite(s):
                    dropped[name][fmt] = "non-finite sensitivity on the scoring batches"
                    continue
                scores[name][fmt] += s
            if report is not None:
                report((b * len(layers) + li + 1) / total, f"batch {b + 1}/{len(batches)}: {name}")
        del calls, grads
    for name in layers:
        for fmt in dropped[name]:
            scores[name].pop(fmt, None)
    return scores, dropped


class LossEvaluator:
    """The real end-to-end loss of an assignment on held-out batches (for refinement and tests).

    Without ``loss_fn`` or labels the loss is the relative output error
    ``Σ ||(out_q - out) · mask||² / Σ ||out · mask||²`` against the float model. Quantized
    modules are built once per (layer, format) and swapped into the model only while a batch
    runs; the model is restored afterwards.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], layers: dict[str, nn.Module],
                 loss_fn: LossFn | None = None, quantized: LayerQuantizer | None = None):
        self.model = model
        self.device = model_device(model)
        self.batches = [to_device(b, self.device) for b in batches]
        self.layers = layers
        self.loss_fn = loss_fn
        self.quantized = LayerQuantizer() if quantized is None else quantized
        with eval_mode(model), torch.no_grad():
            self.reference = [run_batch(model, b) for b in self.batches]

    def __call__(self, assignment: Mapping[str, str]) -> float:
        replacement = {}
        for name, fmt in assignment.items():
            if fmt == UNQUANTIZED:
                continue
            replacement[name] = quantized_copy(self.layers[name], fmt, name, self.quantized)
        with swapped(self.model, replacement), eval_mode(self.model), torch.no_grad():
            losses, err, ref_norm = [], 0.0, 0.0
            for batch, reference in zip(self.batches, self.reference, strict=True):
                output = run_batch(self.model, batch)
                loss = model_loss(output, batch, self.loss_fn)
                if loss is not None:
                    losses.append(float(loss))
                    continue
                out, ref = output_tensor(output).float(), output_tensor(reference).float()
                mask = output_mask(ref, batch)
                if mask is not None:
                    out, ref = out * mask, ref * mask
                err += float((out - ref).pow(2).sum())
                ref_norm += float(ref.pow(2).sum())
        if losses:
            return sum(losses) / len(losses)
        return err / max(ref_norm, 1e-30)
