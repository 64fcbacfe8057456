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

The output layer itself (an LM head: the last recorded call made ``out``, and it has more outputs
than inputs) needs no probe: its ``J`` is the identity, so its score is taken exactly,
``||ΔY · mask||²`` per sample (:class:`ExactOutput`). And the probes need not be drawn over the
vocabulary: ``Wᵀ r`` for ``r ~ N(0, I)`` has the law of ``L e`` with ``L Lᵀ = Wᵀ W`` and
``e ~ N(0, I)`` over the hidden size, so the backward starts at the head's input from ``L e``
(:func:`output_factor`, computed once per search). The estimate for every other layer is
unchanged in expectation; a batch of 2 x 128 tokens of a 32000-word vocabulary no longer holds
``probes`` vocabulary-wide probes and their gradients through the head.

Measured on all-MiniLM-L6-v2 (int4_g128, 16 calibration sentences, Spearman rank correlation
against the embedding damage of quantizing each layer alone, on other sentences): per-sample
squared dot product 0.947, one dot product over the whole batch 0.925, the elementwise square of
the same probe gradients 0.948, plain weight error 0.34. The dot product is kept because it is
the unbiased estimate of ``||J_l ΔY||²``; with the 64 bundled sentences it reaches 0.98
(``bench/results/search-cpu.md``).

Memory, per scoring batch: every layer's input ``X_l`` and its gradient under each probe are
held (so about ``(1 + probes)`` times the batch's linear-layer activations; model parameters are
frozen during the pass, so no weight gradients exist); perturbed outputs are computed one layer
call at a time, every format's ``ΔY`` of that call together, and scored against one probe
gradient at a time (:func:`layer_scores`). Hugging Face models' repeated blocks run with activation checkpointing
(non-reentrant; recomputed in each backward), so the autograd graph does not keep their internal
activations (eager attention probabilities, MLP intermediates) for all blocks at once; this costs
about 20 % more scoring time on MiniLM and leaves the scores unchanged, so the search turns it on
only when a batch's recorded activations exceed ``CHECKPOINT_ABOVE_BYTES``. Each layer's quantized
modules are built once and kept for the stage. Fewer probes or shorter scoring batches lower the
peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from autoq.calibration import Batch, run_batch, to_device
from autoq.formats import UNQUANTIZED
from autoq.profile import eval_mode, model_device
from autoq.swap import LayerQuantizer, QuantizedMemo, float_weight, quantized_copy, swapped

Report = Callable[[float, str], None]
LossFn = Callable[[object, Batch], torch.Tensor]

PROBES = 8
# Activation checkpointing of the repeated blocks when one batch's recorded layer inputs and
# outputs exceed this (the search decides from the profile): below it, the uncheckpointed graph
# costs a few times that much memory and each probe's backward skips the blocks' recompute
# (20M Llama, 8 batches x 8 probes: 1.4 s instead of 2.5 s).
CHECKPOINT_ABOVE_BYTES = 128 * 2**20


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


@dataclass
class ExactOutput:
    """Stands in for the probe gradients of the layer whose output *is* the model's output: there
    the gradient of ``r · out`` is the probe ``r`` itself, so the layer's score is taken in
    expectation, ``E_r[(r · ΔY)²] = ||ΔY · mask||²`` per sample, with no probe held."""

    mask: torch.Tensor | None

    def score(self, dy: torch.Tensor) -> float:
        return float((dy if self.mask is None else dy * self.mask).pow(2).sum())

    def masked_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The call's input as fp32 rows ``[tokens, K]``, padded positions zeroed."""
        x = x.float() if self.mask is None else x.float() * self.mask.to(torch.float32)
        return x.reshape(-1, x.shape[-1])


class OutputInputs:
    """The output layer's inputs over all scoring batches, from which a weight-only format's exact
    score ``||X ΔWᵀ||²`` is taken once per search (:func:`add_output_scores`) instead of a forward
    per format and batch: kept as rows while there are fewer than ``K`` of them, then as the
    Gram matrix ``G = XᵀX`` (``Σ_n ΔW_n G ΔW_nᵀ``), so the product costs ``min(tokens, K)·N·K``."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.count = 0
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.count += x.shape[0]
        if self.gram is None and self.count <= x.shape[1]:
            self.rows.append(x)
            return
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            for r in self.rows:
                self.gram += (r.T @ r).double()
            self.rows = []
        self.gram += (x.T @ x).double()

    def damage(self, dw: torch.Tensor) -> float:
        """``||X dwᵀ||²`` for a chunk of weight rows ``dw`` (fp32)."""
        if self.gram is not None:
            if self.gram.dtype != torch.float32:  # summed in float64, multiplied in fp32
                self.gram = self.gram.float()
            return float(((dw @ self.gram) * dw).sum(dtype=torch.float64))
        return sum(float((r @ dw.T).pow(2).sum(dtype=torch.float64)) for r in self.rows)


@dataclass
class OutputLayer:
    """The recorded call that produced the model's output (``tensors[index]``), a linear layer with
    more outputs than inputs (an LM head): the probes are drawn at its *input*, where ``Wᵀ r``
    for ``r ~ N(0, I)`` is distributed as ``L e`` with ``L Lᵀ = Wᵀ W`` and ``e ~ N(0, I)``, so no
    vocabulary-wide probe is drawn or carried back through the head."""

    index: int
    input: torch.Tensor  # the call's input, part of the graph
    factor: torch.Tensor  # L


GRAM_ROWS = 4096  # rows of W converted to fp32 at a time for Wᵀ W (a bf16 LM head is hundreds of MB)


def output_factor(module: nn.Module) -> torch.Tensor | None:
    """``L`` with ``L Lᵀ = Wᵀ W`` for an output layer worth drawing input-space probes for (more
    outputs than inputs, ``Wᵀ W`` positive definite), else ``None``."""
    weight = float_weight(module).detach()
    n, k = weight.shape
    if n <= k:
        return None
    gram = torch.zeros(k, k, dtype=torch.float64, device=weight.device)
    for rows in weight.split(GRAM_ROWS):
        rows = rows.float()
        gram += (rows.T @ rows).double()
    factor, info = torch.linalg.cholesky_ex(gram)
    return factor.float() if int(info) == 0 else None


def output_layer(output, call_output: torch.Tensor, index: int, call_input: torch.Tensor, module: nn.Module,
                 name: str, factors: dict[str, torch.Tensor | None]) -> OutputLayer | None:
    """An :class:`OutputLayer` when the recorded call (``call_output = module(call_input)``) made the
    model's output; ``factors`` caches :func:`output_factor` by layer name for the search."""
    try:
        if output_tensor(output) is not call_output:
            return None
    except TypeError:
        return None
    if name not in factors:
        factors[name] = output_factor(module)
    factor = factors[name]
    return None if factor is None else OutputLayer(index, call_input, factor)


def probe_seed(seed: int, batch_index: int) -> int:
    """The seed of calibration batch ``batch_index``'s random probes: each batch has its own, so a
    batch's score does not depend on which batches ran before it (or on which worker)."""
    return (seed * 1_000_003 + batch_index) % 2**63


def output_gradients(output, batch: Batch, tensors: list[torch.Tensor], loss_fn: LossFn | None, probes: int,
                     seed: int, head: OutputLayer | None = None) -> tuple[list, int]:
    """``(grads, batch_size)``: the gradient of the loss (one entry, ``batch_size`` 0: elementwise
    score) or of each random output probe (``probes`` entries; ``batch_size`` for the per-sample
    score) with respect to ``tensors``. ``seed``: the batch's :func:`probe_seed`; the probes are
    drawn on the output's own device (the last one of a model spread over several). With ``head``
    the probes start at the head's input and its own entry is an :class:`ExactOutput`."""
    loss = model_loss(output, batch, loss_fn)
    if loss is not None:
        return [torch.autograd.grad(loss, tensors, allow_unused=True)], 0
    out = output_tensor(output)
    mask = output_mask(out, batch)
    generator = torch.Generator(device=out.device).manual_seed(seed)
    grads = []
    if head is not None:
        x, others = head.input, [t for i, t in enumerate(tensors) if i != head.index]
        shape = (*x.shape[:-1], head.factor.shape[0])
        for p in range(probes):
            e = torch.randn(shape, generator=generator, device=out.device, dtype=torch.float32)
            z = (e @ head.factor.T).to(x.dtype)
            if mask is not None:
                z = z * mask
            if x.requires_grad:
                g = list(torch.autograd.grad(x, others, grad_outputs=z, allow_unused=True,
                                             retain_graph=p < probes - 1))
            else:  # nothing recorded before the head is upstream of it
                g = [None] * len(others)
            g.insert(head.index, ExactOutput(mask))
            grads.append(g)
        return grads, out.shape[0] if out.dim() >= 2 else 1
    for p in range(probes):
        r = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        if mask is not None:
            r = r * mask
        grads.append(torch.autograd.grad((r * out).sum(), tensors, allow_unused=True, retain_graph=p < probes - 1))
    return grads, out.shape[0] if out.dim() >= 2 else 1


def _record_gradients(model: nn.Module, batch: Batch, layers: dict[str, nn.Module], loss_fn: LossFn | None,
                      probes: int, seed: int, checkpointing: bool = True,
                      factors: dict[str, torch.Tensor | None] | None = None):
    """One forward with every layer's input and output recorded, then the backward pass(es).

    Returns ``(calls, grads, batch_size)``: ``calls`` lists ``(layer, input, float output)`` per
    layer call; ``grads[p][j]`` is the gradient for call ``j`` under probe ``p`` (one entry
    when a real loss is used); ``batch_size`` is 0 for a real loss (elementwise score).
    ``factors``: the search's cache of :func:`output_factor`.
    """
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    recording = [True]  # off once the forward is done: checkpointed blocks rerun it in backward
    last_input: list = [None]  # the last call's input, in the graph (the head's, for OutputLayer)

    def make_hook(name: str):
        def hook(module, args, output):
            if not output.requires_grad:  # nothing upstream needs a gradient: start the graph here
                output = output.detach().requires_grad_(True)
            if recording[0]:
                calls.append((name, args[0].detach(), output))
                last_input[0] = args[0]
            return output
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), _FrozenParameters(model), torch.enable_grad(), \
                _checkpointed_blocks(model, checkpointing):
            output = run_batch(model, batch)
            recording[0] = False
            head = None
            if calls and factors is not None:
                name = calls[-1][0]
                head = output_layer(output, calls[-1][2], len(calls) - 1, last_input[0], layers[name], name, factors)
            last_input[0] = None
            grads, batch_size = output_gradients(output, batch, [y for _, _, y in calls], loss_fn, probes, seed, head)
    finally:
        for h in handles:
            h.remove()
    return [(name, x, y.detach()) for name, x, y in calls], grads, batch_size


def _probe_scores(diffs: torch.Tensor, grads: list[torch.Tensor], batch_size: int) -> list[float]:
    """Per format (``diffs[f]`` = ΔY), the mean over probes of the squared per-sample dot product
    with the probe gradient: all formats against one probe gradient at a time."""
    per_sample = diffs.dim() >= 3 and diffs.shape[1] == batch_size
    diffs = diffs.reshape(diffs.shape[0], batch_size if per_sample else 1, -1)
    total = torch.zeros(diffs.shape[0], dtype=torch.float64, device=diffs.device)
    for g in grads:
        dots = torch.einsum("fbx,bx->fb", diffs, g.float().reshape(diffs.shape[1], -1))
        total += dots.double().pow(2).sum(dim=1)
    return (total / len(grads)).tolist()


def layer_scores(qmodules: Mapping[str, nn.Module], calls: list, mine: list[int], grads: list,
                 batch_size: int, inputs: OutputInputs) -> tuple[dict[str, float], dict[str, str]]:
    """This batch's S for one layer under each format of ``qmodules``, and the formats whose module
    raised on the recorded inputs (with why). Perturbed outputs are computed one call at a time;
    under random probes the formats' ΔY are scored together against each probe. When the layer is
    the model's output layer, its inputs go to ``inputs`` and its weight-only formats are left out
    of the totals: they are scored from ``inputs`` once the batches are done
    (:func:`add_output_scores`)."""
    totals = {fmt: 0.0 for fmt in qmodules}
    failed: dict[str, str] = {}
    exact_calls = False
    for j in mine:
        _, x, y = calls[j]
        first = grads[0][j]
        if first is None:  # the output does not depend on this call
            continue
        with torch.no_grad():
            y = y.float()
            diffs: dict[str, torch.Tensor] = {}
            exact = isinstance(first, ExactOutput)
            if exact:
                exact_calls = True
                inputs.add(first.masked_rows(x))
            for fmt, qmodule in qmodules.items():
                if fmt in failed or (exact and qmodule.format.weight_only):
                    continue
                try:
                    dy = qmodule(x).float() - y
                except Exception as err:  # a kernel failing on these inputs drops the format
                    failed[fmt] = f"raised {type(err).__name__} while scoring: {err}"
                    continue
                if isinstance(first, ExactOutput):
                    totals[fmt] += first.score(dy)
                elif not batch_size:  # a real loss: elementwise (diagonal Fisher)
                    totals[fmt] += float((first.float() * dy).pow(2).sum())
                else:
                    diffs[fmt] = dy
            if diffs:
                stacked, names = torch.stack(list(diffs.values())), list(diffs)
                diffs.clear()
                for fmt, s in zip(names, _probe_scores(stacked, [g[j] for g in grads], batch_size), strict=True):
                    totals[fmt] += s
                del stacked
    if exact_calls:
        for fmt, qmodule in qmodules.items():
            if qmodule.format.weight_only:
                del totals[fmt]
    return totals, failed


def _standing(name: str, module: nn.Module, fmts: Sequence[str], quantizer: LayerQuantizer,
              dropped: dict) -> dict[str, nn.Module]:
    """The quantized modules of ``fmts`` not dropped yet (one that cannot be built is dropped)."""
    qmodules = {}
    for fmt in fmts:
        if fmt == UNQUANTIZED or fmt in dropped[name]:
            continue
        try:
            qmodules[fmt] = quantized_copy(module, fmt, name, quantizer)
        except Exception as err:
            dropped[name][fmt] = f"raised {type(err).__name__} while scoring: {err}"
    return qmodules


def _add_totals(name: str, totals: Mapping[str, float], scores: dict, dropped: dict) -> None:
    for fmt, s in totals.items():
        if fmt in dropped[name]:
            continue
        if not math.isfinite(s):
            dropped[name][fmt] = "non-finite sensitivity on the scoring batches"
            continue
        scores[name][fmt] += s


def add_layer_scores(name: str, module: nn.Module, fmts: Sequence[str], quantizer: LayerQuantizer, calls: list,
                     grads: list, batch_size: int, scores: dict, dropped: dict,
                     inputs: dict[str, OutputInputs]) -> None:
    """Add one batch's scores of layer ``name`` for each of ``fmts`` still standing to
    ``scores[name]``; a format whose module cannot be built or run, or whose score is not finite,
    goes to ``dropped[name]`` with the reason (shared by the in-memory and streamed paths). The
    output layer's inputs are gathered in ``inputs[name]``: call :func:`add_output_scores` after
    the last batch."""
    mine = [j for j, call in enumerate(calls) if call[0] == name]
    gathered = inputs.get(name, OutputInputs())
    totals, failed = layer_scores(_standing(name, module, fmts, quantizer, dropped), calls, mine, grads,
                                  batch_size, gathered)
    dropped[name].update(failed)
    _add_totals(name, totals, scores, dropped)
    if gathered.count:
        inputs[name] = gathered


def add_output_scores(name: str, module: nn.Module, fmts: Sequence[str], quantizer: LayerQuantizer,
                    inputs: dict[str, OutputInputs], scores: dict, dropped: dict) -> None:
    """The output layer's exact score of each weight-only format, ``||X ΔWᵀ||²`` over every
    scoring batch at once (``X`` = ``inputs[name]``), ``ΔW`` a chunk of rows at a time."""
    gathered = inputs.pop(name, None)
    if gathered is None:
        return
    weight = float_weight(module).detach()
    totals = {}
    for fmt, qmodule in _standing(name, module, fmts, quantizer, dropped).items():
        if not qmodule.format.weight_only:
            continue
        qweight, total = qmodule.quantized_weight(), 0.0
        with torch.no_grad():
            for start in range(0, weight.shape[0], GRAM_ROWS):
                stop = min(start + GRAM_ROWS, weight.shape[0])
                dw = qmodule.format.dequantize(qweight.rows(start, stop), torch.float32) - weight[start:stop].float()
                total += gathered.damage(dw)
        totals[fmt] = total
    _add_totals(name, totals, scores, dropped)


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

    factors: dict[str, torch.Tensor | None] = {}
    inputs: dict[str, OutputInputs] = {}  # the output layer's, for add_output_scores
    for b, batch in enumerate(batches):
        calls, grads, batch_size = _record_gradients(model, to_device(batch, device), layers, loss_fn,
                                                     probes, probe_seed(seed, b), checkpointing, factors)
        for li, (name, module) in enumerate(layers.items()):
            add_layer_scores(name, module, candidates[name], quantized, calls, grads, batch_size, scores, dropped,
                             inputs)
            if report is not None:
                report((b * len(layers) + li + 1) / total, f"batch {b + 1}/{len(batches)}: {name}")
        del calls, grads
    for name in list(inputs):
        add_output_scores(name, layers[name], candidates[name], quantized, inputs, scores, dropped)
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
