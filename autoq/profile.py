"""Profile: which activation shapes each quantizable layer sees, how often, and in which dtype.

One forward pass per calibration batch with a forward pre-hook on every quantizable layer. A
layer's input ``[..., K]`` is recorded as its flattened shape ``(M, K)`` (M = product of the
leading dimensions: batch x tokens). A small sample of each layer's real input (the first rows of
the first batch) is kept too: the benchmark stage uses it to check that every candidate format
gives finite, accurate outputs on this layer's actual activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from autoq.calibration import Batch, run_batch, to_device
from autoq.swap import layer_shape

Report = Callable[[float, str], None]


@dataclass
class LayerProfile:
    out_features: int
    in_features: int
    shapes: dict[tuple[int, int], int] = field(default_factory=dict)  # (M, K) -> calls
    dtype: str = ""  # activation dtype, e.g. "float32"


@dataclass
class Profile:
    layers: dict[str, LayerProfile]
    num_batches: int
    samples: dict[str, torch.Tensor]  # name -> [rows, K], detached, on the model's device

    def batch_activation_bytes(self) -> int:
        """Bytes of every layer's inputs and outputs for one calibration batch (the mean over
        batches): what recording them all, as the sensitivity pass does, holds."""
        total = 0
        for entry in self.layers.values():
            size = torch.empty((), dtype=getattr(torch, entry.dtype or "float32")).element_size()
            total += sum(m * (k + entry.out_features) * count for (m, k), count in entry.shapes.items()) * size
        return total // max(self.num_batches, 1)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no dropout), restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def profile(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: dict[str, nn.Module],
    *,
    sample_rows: int = 256,
    report: Report | None = None,
) -> Profile:
    """Run every batch once and record each layer's input shapes, counts and dtype."""
    device = model_device(model)
    result = {name: LayerProfile(*layer_shape(m)) for name, m in layers.items()}
    samples: dict[str, torch.Tensor] = {}
    position = {"batch": 0, "seen": set()}
    total = len(batches) * max(len(layers), 1)

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            entry = result[name]
            m = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] else 0
            key = (int(m), int(x.shape[-1]))
            entry.shapes[key] = entry.shapes.get(key, 0) + 1
            entry.dtype = str(x.dtype).removeprefix("torch.")
            if name not in samples:
                samples[name] = x.detach().reshape(-1, x.shape[-1])[:sample_rows].clone()
            if report is not None and name not in position["seen"]:
                position["seen"].add(name)
                done = position["batch"] * len(layers) + len(position["seen"])
                report(done / total, f"batch {position['batch'] + 1}/{len(batches)}: {name}")
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i, batch in enumerate(batches):
                position["batch"], position["seen"] = i, set()
                run_batch(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    if report is not None:
        report(1.0, f"{len(batches)} batches, {len(layers)} layers")
    return Profile(result, len(batches), samples)


def collect_hessians(model: nn.Module, batches: Sequence[Batch], layers: dict[str, nn.Module]
                     ) -> dict[str, torch.Tensor]:
    """Each layer's input Hessian ``H = 2/n XᵀX`` (fp32 ``[K, K]``) over the calibration batches,
    for GPTQ. Layers fed the same input tensor (q/k/v) share one Hessian object; a layer that
    never ran is left out."""
    from autoq import gptq

    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        accumulators = gptq.accumulate_hessians(model, [to_device(b, device) for b in batches], layers)
    return {name: acc.hessian for name, acc in accumulators.items() if acc.rows > 0}
