"""FP8 formats: ``float8_e4m3fn`` weights per output channel, with 16-bit (W8A16-FP8) or dynamic
per-token FP8 (W8A8-FP8) activations.

Storage: ``qweight`` float8_e4m3fn ``[N, K]``, ``scale`` fp32 ``[N]`` with ``absmax / 448``
(448 is e4m3's largest finite value); ``w = q * scale``. W8A8-FP8 quantizes each token the same
way at run time and accumulates the products exactly scaled (``torch._scaled_mm`` on GPUs with
FP8 tensor cores, compute capability 8.9+; elsewhere the format reports itself unsupported).

compressed-tensors (``float-quantized``): ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale``
``[N, 1]``. fp8_e4m3_dynamic is the ``FP8_DYNAMIC`` preset (channel weights, dynamic per-token
activations); fp8_e4m3_weight_only is FP8 channel (or tensor) weights with no activation
quantization, which vLLM runs as W8A16-FP8. The static ``FP8`` preset (a calibrated per-tensor
activation scale) has no autoq format and is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoq import primitives as P
from autoq.formats.base import (
    GPTQGrid,
    PerChannel,
    QuantizedWeight,
    int_args,
    plain_weights,
    scale_out,
)

FP8_MIN_CAPABILITY = (8, 9)


def float_args(strategy: str, dynamic: bool = False) -> dict:
    return int_args(8, True, strategy, dynamic=dynamic, type_="float")


@dataclass(frozen=True)
class Fp8ChannelParams:
    scale: torch.Tensor  # [N, 1] fp32: absmax / 448 per output channel


def fit_fp8(w_rows: torch.Tensor) -> Fp8ChannelParams:
    return Fp8ChannelParams((w_rows.float().abs().amax(dim=1, keepdim=True) / P.FP8_E4M3_MAX)
                            .clamp(min=P.SCALE_EPS**2))


def fake_quant_fp8(w_cols: torch.Tensor, params: Fp8ChannelParams, col_offset: int = 0) -> torch.Tensor:
    """The nearest e4m3 grid value (per-channel scale) of each weight."""
    q = (w_cols.float() / params.scale).clamp(-P.FP8_E4M3_MAX, P.FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn).float() * params.scale


class Fp8PerChannel(PerChannel):
    """float8_e4m3fn weights, one fp32 scale per output channel."""

    value_dtype = torch.float8_e4m3fn

    def unsupported_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < FP8_MIN_CAPABILITY:
                return (f"FP8 needs compute capability 8.9 or newer (Ada, Hopper); this GPU is "
                        f"sm_{capability[0]}{capability[1]}")
        return None

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        q, scale = P.quantize_fp8_e4m3(weight, (1, k))
        return QuantizedWeight(q, scale.reshape(-1), None, n, k)

    def gptq_grid(self, out_features: int, in_features: int) -> GPTQGrid:
        def encode(w_hat: torch.Tensor, params: list) -> QuantizedWeight:
            scale = params[0].scale
            q = (w_hat / scale).clamp(-P.FP8_E4M3_MAX, P.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
            return QuantizedWeight(q, scale.reshape(-1), None, out_features, in_features)

        return GPTQGrid("fp8 e4m3 per channel", in_features, fit_fp8, fake_quant_fp8, encode)

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"weight": weight.qweight.clone(),
                "weight_scale": scale_out(weight.scale.reshape(-1, 1), model_dtype)}

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        q = tensors.pop(f"{name}.weight", None)
        if q is None or q.dtype != torch.float8_e4m3fn:
            stored = "missing" if q is None else f"stored as {q.dtype}"
            raise ValueError(f"layer {name!r}: its FP8 weight is {stored}; expected float8_e4m3fn")
        if tuple(q.shape) != (out_features, in_features):
            raise ValueError(f"layer {name!r}: weight has shape {tuple(q.shape)}, the model expects "
                             f"{(out_features, in_features)}")
        scale = tensors.pop(f"{name}.weight_scale").float().reshape(-1).expand(out_features)
        tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: zero when present
        return QuantizedWeight(q, scale.contiguous(), None, out_features, in_features)

    def _accepts_weights(self, weights: dict) -> bool:
        return (plain_weights(weights, "float") and weights["num_bits"] == 8 and weights["symmetric"]
                and weights["strategy"] in ("channel", "tensor"))


class Fp8WeightOnly(Fp8PerChannel):
    """W8A16-FP8: FP8 weights, 16-bit activations."""

    def ct_scheme(self) -> dict:
        return {"weights": float_args("channel"), "input_activations": None,
                "output_activations": None, "format": "float-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        return self._accepts_weights(weights) and input_activations is None


class Fp8Dynamic(Fp8PerChannel):
    """W8A8-FP8: FP8 weights per channel, activations quantized to FP8 per token at run time."""

    weight_only = False

    def reference_linear(self, x: torch.Tensor, weight: QuantizedWeight,
                         bias: torch.Tensor | None) -> torch.Tensor:
        xq, xs = P.quantize_per_token_fp8(x)
        acc = xq.double() @ weight.qweight.double().t()  # products of two fp8 values are exact
        y = (acc * xs.double() * weight.scale.double()[None, :]).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def ct_scheme(self) -> dict:
        return {"weights": float_args("channel"),
                "input_activations": float_args("token", dynamic=True),
                "output_activations": None, "format": "float-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        acts = input_activations
        return (self._accepts_weights(weights) and acts is not None and acts["type"] == "float"
                and acts["num_bits"] == 8 and acts["strategy"] == "token" and acts["dynamic"] is True)
