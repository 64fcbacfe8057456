"""The sensitivity estimator against closed forms, on a linear model small enough to compute them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoq import sensitivity
from autoq.swap import quantized_copy

FMT = "int4_g32"


class TwoLayers(nn.Module):
    """``out = head(body(x))``: the head has more outputs than inputs, like an LM head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 96)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def setting():
    model = TwoLayers().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 6, 32, generator=gen) for _ in range(2)]
    layers = {"body": model.body, "head": model.head}
    return model, batches, layers


def closed_form(model, batches, name: str) -> float:
    """``Σ_t ||J ΔY_t||²``: the squared output damage of quantizing ``name`` alone, linearised
    (exact here: the model is linear), which the probe estimator's expectation is. The head's
    weight-only score is taken from its input Gram matrix, so it is exact to fp32 rounding."""
    module = getattr(model, name)
    q = quantized_copy(module, FMT)
    total = 0.0
    with torch.no_grad():
        for x in batches:
            inp = x if name == "body" else model.body(x)
            dy = inp @ (q.dequantize() - module.weight).T  # the format's own arithmetic, no kernel rounding
            out_damage = dy @ model.head.weight.T if name == "body" else dy
            total += float(out_damage.pow(2).sum())
    return total


def test_output_layer_is_scored_exactly_and_earlier_layers_in_expectation(setting):
    model, batches, layers = setting
    scores, dropped = sensitivity.score(model, batches, layers, {n: [FMT] for n in layers}, probes=3000)
    assert not any(dropped.values())
    # the head made the output: its score is the expectation itself, not a 3000-probe estimate
    assert scores["head"][FMT] == pytest.approx(closed_form(model, batches, "head"), rel=1e-5)
    # the body's probes were drawn at the head's input (L e with L Lᵀ = Wᵀ W): same expectation
    assert scores["body"][FMT] == pytest.approx(closed_form(model, batches, "body"), rel=0.06)


def test_output_factor_reproduces_the_head_gram_and_skips_narrow_heads():
    head = nn.Linear(16, 40)
    factor = sensitivity.output_factor(head)
    w = head.weight.detach()
    torch.testing.assert_close(factor @ factor.T, w.T @ w, rtol=1e-4, atol=1e-4)
    assert sensitivity.output_factor(nn.Linear(16, 16)) is None  # no fewer inputs than outputs: no gain


def test_padding_positions_count_nothing_in_the_exact_head_score(setting):
    model, batches, layers = setting

    def masked(x, mask):
        return {"x": x, "attention_mask": mask}

    class Keyed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attention_mask):
            return self.inner(x)

    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    keyed = Keyed(model).eval()
    got, _ = sensitivity.score(keyed, [masked(x, mask) for x in batches], {"head": model.head}, {"head": [FMT]},
                               probes=2)
    trimmed = [x[:, :4] for x in batches]
    assert got["head"][FMT] == pytest.approx(closed_form(model, trimmed, "head"), rel=1e-5)


def test_a_head_format_that_quantizes_activations_is_scored_by_its_module(setting):
    """int8_dynamic's output is not ``x @ dequantize(W)ᵀ`` (activations are rounded per token), so
    its head score comes from running the module on each batch, not from the Gram matrix."""
    model, batches, layers = setting
    scores, dropped = sensitivity.score(model, batches, {"head": model.head}, {"head": ["int8_dynamic", FMT]},
                                        probes=2)
    assert not any(dropped.values())
    q = quantized_copy(model.head, "int8_dynamic")
    with torch.no_grad():
        expected = sum(float((q(model.body(x)) - model(x)).pow(2).sum()) for x in batches)
    assert scores["head"]["int8_dynamic"] == pytest.approx(expected, rel=1e-5)
    assert scores["head"][FMT] == pytest.approx(closed_form(model, batches, "head"), rel=1e-5)
