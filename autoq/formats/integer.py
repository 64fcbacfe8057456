"""Integer formats: int8 per output channel (W8A8 and W8A16) and asymmetric int4 per group (W4A16).

Storage (``QuantizedWeight`` fields, ``[N, K]`` = ``[out_features, in_features]``):

- int8 formats: ``qweight`` int8 ``[N, K]`` in [-127, 127] (checkpoints from elsewhere may hold
  -128), ``scale`` fp32 ``[N]``; ``w = q * scale``.
- int4 formats: ``qweight`` uint8 ``[N, K // 2]`` (element 2j in the low nibble of byte j),
  ``scale`` fp16 ``[N, K // G]``, ``zero_point`` uint8 ``[N, K // G]`` in ``[0, 15]``;
  ``w = (q - zero_point) * scale``.

compressed-tensors (values stored offset by ``2**(bits-1)``, packed into int32 words in
compressed-tensors' order, see ``primitives.pack_int32``):

| format           | scheme                                            | format         |
|------------------|---------------------------------------------------|----------------|
| int8_dynamic     | int8 symmetric channel weights + int8 symmetric   | int-quantized  |
|                  | dynamic per-token input activations (W8A8)        |                |
| int8_weight_only | int8 symmetric channel weights (W8A16)            | pack-quantized |
| int4_g{G}        | int4 asymmetric group G weights (W4A16_ASYM)      | pack-quantized |

W8A16 uses pack-quantized because that is what compressed-tensors infers for weight-only int8 and
what vLLM's WNA16 kernels accept. int4 zero points are packed along the output dimension.
"""

from __future__ import annotations

import torch

from autoq import primitives as P
from autoq.formats.base import (
    Format,
    QuantizedWeight,
    TensorSpecs,
    int_args,
    plain_weights,
    scale_out,
)


def pop_int_weight(name: str, tensors: dict[str, torch.Tensor], num_bits: int,
                   out_features: int, in_features: int) -> torch.Tensor:
    """A layer's integer weight from a compressed-tensors checkpoint as unsigned values
    (stored value + ``2**(bits-1)``), uint8 ``[N, K]``: from ``weight_packed`` or plain int8."""
    packed = tensors.pop(f"{name}.weight_packed", None)
    plain = tensors.pop(f"{name}.weight", None)
    if packed is not None:
        unsigned = P.unpack_int32(packed, num_bits, in_features)
    elif plain is not None and plain.dtype == torch.int8:
        unsigned = (plain.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8)
    else:
        stored = "missing" if plain is None else f"stored as {plain.dtype}"
        raise ValueError(f"layer {name!r}: its quantized weight is {stored}; expected weight_packed "
                         "(int32) or weight (int8)")
    if tuple(unsigned.shape) != (out_features, in_features):
        raise ValueError(f"layer {name!r}: weight has shape {tuple(unsigned.shape)}, the model "
                         f"expects {(out_features, in_features)}")
    return unsigned


class Int8PerChannel(Format):
    """int8 symmetric weights, one fp32 scale per output channel."""

    weight_bits = 8

    def storage_bits(self, out_features: int, in_features: int) -> float:
        return 8.0 + 32 / in_features

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        return {"qweight": ((out_features, in_features), torch.int8),
                "scale": ((out_features,), torch.float32)}

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        q, scale = P.quantize_int8_symmetric(weight, (1, k))
        return QuantizedWeight(q, scale.reshape(-1), None, n, k)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (weight.qweight.float() * weight.scale.float()[:, None]).to(dtype)

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        unsigned = pop_int_weight(name, tensors, 8, out_features, in_features)
        scale = tensors.pop(f"{name}.weight_scale")
        tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: all zero when present
        # "tensor" strategy: one scale for every row.
        scale = scale.float().reshape(-1).expand(out_features).contiguous()
        return QuantizedWeight((unsigned.to(torch.int16) - 128).to(torch.int8), scale, None,
                               out_features, in_features)

    def _accepts_weights(self, weights: dict) -> bool:
        return (plain_weights(weights) and weights["num_bits"] == 8 and weights["symmetric"]
                and weights["strategy"] in ("channel", "tensor"))


class Int8Dynamic(Int8PerChannel):
    """W8A8: int8 weights per output channel; activations quantized per token at run time to
    [-127, 127] with ``scale = absmax / 127``, accumulated exactly (int32)."""

    def reference_linear(self, x: torch.Tensor, weight: QuantizedWeight,
                         bias: torch.Tensor | None) -> torch.Tensor:
        xq, xs = P.quantize_per_token_int8(x)
        acc = xq.double() @ weight.qweight.double().t()
        y = (acc * xs.double() * weight.scale.double()[None, :]).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def ct_scheme(self) -> dict:
        return {"weights": int_args(8, True, "channel"),
                "input_activations": int_args(8, True, "token", dynamic=True),
                "output_activations": None, "format": "int-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        acts = input_activations
        return (self._accepts_weights(weights) and acts is not None and acts["type"] == "int"
                and acts["num_bits"] == 8 and acts["symmetric"] and acts["strategy"] == "token"
                and acts["dynamic"] is True)

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # A clone: layers that share a weight share its qweight, and safetensors refuses aliases.
        return {"weight": weight.qweight.clone(),
                "weight_scale": scale_out(weight.scale.reshape(-1, 1), model_dtype)}


class Int8WeightOnly(Int8PerChannel):
    """W8A16: int8 weights per output channel, 16-bit activations."""

    def ct_scheme(self) -> dict:
        return {"weights": int_args(8, True, "channel"), "input_activations": None,
                "output_activations": None, "format": "pack-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        return self._accepts_weights(weights) and input_activations is None

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        unsigned = (weight.qweight.to(torch.int16) + 128).to(torch.uint8)
        return {"weight_packed": P.pack_int32(unsigned, 8),
                "weight_scale": scale_out(weight.scale.reshape(-1, 1), model_dtype),
                "weight_shape": torch.tensor([weight.out_features, weight.in_features])}


class Int4Groups(Format):
    """W4A16: asymmetric uint4 per group of ``group_size`` input elements, packed two per byte;
    fp16 scale and uint8 zero point per group. Ranges come from a per-group MSE clip search."""

    weight_bits = 4

    def __init__(self, name: str, description: str, group_size: int):
        super().__init__(name, description)
        self._group_size = group_size

    @property
    def group_size(self) -> int:
        return self._group_size

    def storage_bits(self, out_features: int, in_features: int) -> float:
        return 4.0 + (16 + 8) / self.group_size  # fp16 scale + uint8 zero point per group

    def check(self, out_features: int, in_features: int) -> str | None:
        if in_features % self.group_size != 0:
            return f"in_features={in_features} is not divisible by group size {self.group_size}"
        return None

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        groups = in_features // self.group_size
        return {"qweight": ((out_features, in_features // 2), torch.uint8),
                "scale": ((out_features, groups), torch.float16),
                "zero_point": ((out_features, groups), torch.uint8)}

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        q, scale, zero_point = P.quantize_int4_asymmetric(weight, self.group_size)
        return QuantizedWeight(P.pack_int4(q), scale.to(torch.float16), zero_point, n, k,
                               self.group_size)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = P.unpack_int4(weight.qweight)
        return P.dequantize_affine(q, (1, weight.group_size), weight.scale, weight.zero_point, dtype)

    def ct_scheme(self) -> dict:
        return {"weights": int_args(4, False, "group", self.group_size), "input_activations": None,
                "output_activations": None, "format": "pack-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        # Symmetric int4 checkpoints (zero point 8) load into the asymmetric layout exactly.
        return (plain_weights(weights) and weights["num_bits"] == 4 and weights["strategy"] == "group"
                and weights["group_size"] == self.group_size and input_activations is None)

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # autoq's unsigned value is compressed-tensors' stored value (q + 8).
        return {"weight_packed": P.pack_int32(P.unpack_int4(weight.qweight), 4),
                "weight_zero_point": P.pack_int32(weight.zero_point.t(), 4).t().contiguous(),
                "weight_scale": scale_out(weight.scale, model_dtype),
                "weight_shape": torch.tensor([weight.out_features, weight.in_features])}

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        n, k = out_features, in_features
        groups = k // self.group_size
        unsigned = pop_int_weight(name, tensors, 4, n, k)
        scale = tensors.pop(f"{name}.weight_scale").reshape(n, groups).to(torch.float16)
        zero_point = tensors.pop(f"{name}.weight_zero_point", None)
        if weights["symmetric"]:
            zero_point = torch.full((n, groups), 8, dtype=torch.uint8, device=scale.device)
        elif zero_point is None:
            raise ValueError(f"layer {name!r} is asymmetric but has no weight_zero_point")
        elif zero_point.dtype == torch.int32:  # packed along the output dimension
            zero_point = P.unpack_int32(zero_point.t().contiguous(), 4, n).t().contiguous()
        else:  # older writers stored signed int8 zero points unpacked
            zero_point = (zero_point.reshape(n, groups).to(torch.int16) + 8).to(torch.uint8)
        return QuantizedWeight(P.pack_int4(unsigned), scale, zero_point, n, k, self.group_size)
