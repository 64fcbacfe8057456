"""Integer formats: int8 per output channel (W8A8 and W8A16), int8 per group (W8A16 in groups,
llm-compressor's W8A16 preset) and int4 per group (W4A16).

Storage (``QuantizedWeight`` fields, ``[N, K]`` = ``[out_features, in_features]``):

- int8 formats: ``qweight`` int8 ``[N, K]`` in [-127, 127] (checkpoints from elsewhere may hold
  -128), ``scale`` fp32 ``[N]``; ``w = q * scale``.
- int8 groups (``int8_g{G}``): ``qweight`` as above, ``scale`` fp32 ``[N, K // G]``, one per group
  of G input elements; ``w = q * scale[:, k // G]``.
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
| int8_g{G}        | int8 symmetric group G weights (llm-compressor's  | pack-quantized |
|                  | W8A16 preset for G = 128)                         |                |
| int4_g{G}        | int4 asymmetric group G weights (W4A16_ASYM)      | pack-quantized |
| int4_sym_g{G}    | int4 symmetric group G weights (W4A16)            | pack-quantized |

W8A16 uses pack-quantized because that is what compressed-tensors infers for weight-only int8 and
what vLLM's WNA16 kernels accept. int4 zero points are packed along the output dimension.

Symmetric int4 stores no zero point: its codes are ``q + 8`` with ``q`` in ``[-8, 7]``, so in
memory it is the asymmetric layout with every zero point 8 (kernels run it unchanged). Every
compressed-tensors version, transformers and vLLM's Marlin path load it; compressed-tensors 0.20
cannot build asymmetric int4 layers in transformers without autoq's loader fix (autoq.compat).
"""

from __future__ import annotations

import torch

from autoq import gptq
from autoq import primitives as P
from autoq.formats.base import (
    Format,
    GPTQGrid,
    PerChannel,
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


def int8_from_unsigned(unsigned: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' stored int8 value (``q + 128``, uint8) back to ``q`` (int8)."""
    return (unsigned.to(torch.int16) - 128).to(torch.int8)


def export_packed_int8(weight: QuantizedWeight, scale: torch.Tensor,
                       model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An int8 weight-only layer in compressed-tensors' pack-quantized layout (``scale`` 2-D:
    ``[N, 1]`` per channel, ``[N, K / G]`` per group)."""
    unsigned = (weight.qweight.to(torch.int16) + 128).to(torch.uint8)
    return {"weight_packed": P.pack_int32(unsigned, 8),
            "weight_scale": scale_out(scale, model_dtype),
            "weight_shape": torch.tensor([weight.out_features, weight.in_features])}


def accepts_int8_weights(weights: dict, strategies: tuple[str, ...]) -> bool:
    return (plain_weights(weights) and weights["num_bits"] == 8 and weights["symmetric"]
            and weights["strategy"] in strategies)


class Int8PerChannel(PerChannel):
    """int8 symmetric weights, one fp32 scale per output channel."""

    value_dtype = torch.int8

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        q, scale = P.quantize_int8_symmetric(weight, (1, k))
        return QuantizedWeight(q, scale.reshape(-1), None, n, k)

    def gptq_grid(self, out_features: int, in_features: int) -> GPTQGrid:
        def encode(w_hat: torch.Tensor, params: list) -> QuantizedWeight:
            q, scale = gptq.encode_int8(w_hat, params)
            return QuantizedWeight(q, scale.reshape(-1), None, out_features, in_features)

        return GPTQGrid("int8 symmetric per channel", in_features, gptq.fit_int8, gptq.fake_quant_int8, encode)

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        unsigned = pop_int_weight(name, tensors, 8, out_features, in_features)
        scale = tensors.pop(f"{name}.weight_scale")
        tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: all zero when present
        # "tensor" strategy: one scale for every row.
        scale = scale.float().reshape(-1).expand(out_features).contiguous()
        return QuantizedWeight(int8_from_unsigned(unsigned), scale, None, out_features, in_features)

    def _accepts_weights(self, weights: dict) -> bool:
        return accepts_int8_weights(weights, ("channel", "tensor"))


class Int8Dynamic(Int8PerChannel):
    """W8A8: int8 weights per output channel; activations quantized per token at run time with
    compressed-tensors' convention (``primitives.quantize_per_token_int8``: [-128, 127],
    ``scale = absmax / 127.5``, round half to even), accumulated exactly (int32)."""

    weight_only = False

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
        return export_packed_int8(weight, weight.scale.reshape(-1, 1), model_dtype)


class Int8Groups(Format):
    """W8A16 in groups: int8 symmetric (no zero point, [-127, 127]) per group of ``group_size``
    input elements, one fp32 scale per group (``absmax / 127``, as int8 per channel). For
    G = 128 this is compressed-tensors' / llm-compressor's ``W8A16`` preset."""

    weight_bits = 8

    def __init__(self, name: str, description: str, group_size: int, default_candidate: bool = True):
        super().__init__(name, description, default_candidate=default_candidate)
        self._group_size = group_size

    @property
    def group_size(self) -> int:
        return self._group_size

    def storage_bits(self, out_features: int, in_features: int) -> float:
        return 8.0 + 32 / self.group_size  # fp32 scale per group

    def check(self, out_features: int, in_features: int) -> str | None:
        if in_features % self.group_size != 0:
            return f"in_features={in_features} is not divisible by group size {self.group_size}"
        return None

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        return {"qweight": ((out_features, in_features), torch.int8),
                "scale": ((out_features, in_features // self.group_size), torch.float32)}

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        q, scale = P.quantize_int8_symmetric(weight, (1, self.group_size))
        return QuantizedWeight(q, scale, None, n, k, self.group_size)

    def gptq_grid(self, out_features: int, in_features: int) -> GPTQGrid:
        # int8 per channel's grid (fit_int8 fits any [N, G] block), one group per G columns.
        def encode(w_hat: torch.Tensor, params: list) -> QuantizedWeight:
            q, scale = gptq.encode_int8(w_hat, params)
            return QuantizedWeight(q, scale, None, out_features, in_features, self.group_size)

        return GPTQGrid(f"int8 symmetric g{self.group_size}", self.group_size, gptq.fit_int8,
                        gptq.fake_quant_int8, encode)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return P.dequantize_affine(weight.qweight, (1, weight.group_size), weight.scale, None, dtype)

    def ct_scheme(self) -> dict:
        return {"weights": int_args(8, True, "group", self.group_size),
                "input_activations": None, "output_activations": None, "format": "pack-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        return (accepts_int8_weights(weights, ("group",)) and weights["group_size"] == self.group_size
                and input_activations is None)

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return export_packed_int8(weight, weight.scale, model_dtype)

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        unsigned = pop_int_weight(name, tensors, 8, out_features, in_features)
        groups = in_features // self.group_size
        scale = tensors.pop(f"{name}.weight_scale").float().reshape(out_features, groups).contiguous()
        tensors.pop(f"{name}.weight_zero_point", None)  # symmetric: all zero when present
        return QuantizedWeight(int8_from_unsigned(unsigned), scale, None, out_features, in_features,
                               self.group_size)


class Int4Groups(Format):
    """W4A16: uint4 per group of ``group_size`` input elements, packed two per byte; fp16 scale
    and (asymmetric) a uint8 zero point per group, or (symmetric) an implied zero point of 8.
    Ranges come from a per-group MSE clip search."""

    weight_bits = 4

    def __init__(self, name: str, description: str, group_size: int, symmetric: bool = False):
        # Asymmetric int4 is opt-in: compressed-tensors 0.20 cannot load it without autoq.
        super().__init__(name, description, default_candidate=symmetric)
        self._group_size = group_size
        self.symmetric = symmetric

    @property
    def group_size(self) -> int:
        return self._group_size

    def storage_bits(self, out_features: int, in_features: int) -> float:
        zero_point_bits = 0 if self.symmetric else 8
        return 4.0 + (16 + zero_point_bits) / self.group_size  # fp16 scale (+ uint8 zero point)

    def check(self, out_features: int, in_features: int) -> str | None:
        if in_features % self.group_size != 0:
            return f"in_features={in_features} is not divisible by group size {self.group_size}"
        return None

    def tensor_specs(self, out_features: int, in_features: int) -> TensorSpecs:
        groups = in_features // self.group_size
        specs = {"qweight": ((out_features, in_features // 2), torch.uint8),
                 "scale": ((out_features, groups), torch.float16)}
        if not self.symmetric:
            specs["zero_point"] = ((out_features, groups), torch.uint8)
        return specs

    def weight_from_tensors(self, tensors: dict[str, torch.Tensor], out_features: int,
                            in_features: int) -> QuantizedWeight:
        scale = tensors["scale"]
        zero_point = self._implied_zero_point(scale) if self.symmetric else tensors["zero_point"]
        return QuantizedWeight(tensors["qweight"], scale, zero_point, out_features, in_features,
                               self.group_size)

    @staticmethod
    def _implied_zero_point(scale: torch.Tensor) -> torch.Tensor:
        return torch.full(scale.shape, 8, dtype=torch.uint8, device=scale.device)

    def _quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        if self.symmetric:
            q, scale = P.quantize_int4_symmetric(weight, self.group_size)
            zero_point = self._implied_zero_point(scale)
        else:
            q, scale, zero_point = P.quantize_int4_asymmetric(weight, self.group_size)
        return QuantizedWeight(P.pack_int4(q), scale.to(torch.float16), zero_point, n, k,
                               self.group_size)

    def gptq_grid(self, out_features: int, in_features: int) -> GPTQGrid:
        fit = fit_int4_symmetric if self.symmetric else gptq.fit_int4

        def encode(w_hat: torch.Tensor, params: list) -> QuantizedWeight:
            q, scale, zero_point = gptq.encode_int4(w_hat, params)
            return QuantizedWeight(P.pack_int4(q), scale.to(torch.float16), zero_point, out_features,
                                   in_features, self.group_size)

        kind = "symmetric" if self.symmetric else "asymmetric"
        return GPTQGrid(f"int4 {kind} g{self.group_size}", self.group_size, fit, gptq.fake_quant_int4, encode)

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = P.unpack_int4(weight.qweight)
        return P.dequantize_affine(q, (1, weight.group_size), weight.scale, weight.zero_point, dtype)

    def ct_scheme(self) -> dict:
        return {"weights": int_args(4, self.symmetric, "group", self.group_size),
                "input_activations": None, "output_activations": None, "format": "pack-quantized"}

    def ct_accepts(self, weights: dict, input_activations: dict | None) -> bool:
        return (plain_weights(weights) and weights["num_bits"] == 4 and weights["strategy"] == "group"
                and weights["group_size"] == self.group_size and input_activations is None
                and bool(weights["symmetric"]) == self.symmetric)

    def ct_export(self, weight: QuantizedWeight, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # autoq's unsigned value is compressed-tensors' stored value (q + 8).
        out = {"weight_packed": P.pack_int32(P.unpack_int4(weight.qweight), 4),
               "weight_scale": scale_out(weight.scale, model_dtype),
               "weight_shape": torch.tensor([weight.out_features, weight.in_features])}
        if not self.symmetric:
            out["weight_zero_point"] = P.pack_int32(weight.zero_point.t(), 4).t().contiguous()
        return out

    def ct_load_caveat(self) -> str | None:
        if self.symmetric:
            return None
        from autoq import compat

        if compat.plain_transformers_loads_asymmetric_int4():
            return None
        import compressed_tensors

        return (f"asymmetric int4 ({self.name}): the installed compressed-tensors "
                f"{compressed_tensors.__version__} cannot load it in transformers unless autoq is "
                f"imported first (its 0.19 and older can; vLLM reads it); for a checkpoint every "
                f"loader reads, search with the symmetric int4_sym_g{self.group_size} instead")

    def ct_import(self, name: str, weights: dict, tensors: dict[str, torch.Tensor],
                  out_features: int, in_features: int) -> QuantizedWeight:
        n, k = out_features, in_features
        groups = k // self.group_size
        unsigned = pop_int_weight(name, tensors, 4, n, k)
        scale = tensors.pop(f"{name}.weight_scale").reshape(n, groups).to(torch.float16)
        zero_point = tensors.pop(f"{name}.weight_zero_point", None)
        if weights["symmetric"]:
            zero_point = self._implied_zero_point(scale)
        elif zero_point is None:
            raise ValueError(f"layer {name!r} is asymmetric but has no weight_zero_point")
        elif zero_point.dtype == torch.int32:  # packed along the output dimension
            zero_point = P.unpack_int32(zero_point.t().contiguous(), 4, n).t().contiguous()
        else:  # older writers stored signed int8 zero points unpacked
            zero_point = (zero_point.reshape(n, groups).to(torch.int16) + 8).to(torch.uint8)
        return QuantizedWeight(P.pack_int4(unsigned), scale, zero_point, n, k, self.group_size)


def fit_int4_symmetric(w_group: torch.Tensor) -> gptq.Int4GroupParams:
    """GPTQ parameters of one symmetric int4 group ``[N, G]``: the scale
    ``primitives.quantize_int4_symmetric`` would choose (fp16-exact) and the implied zero point 8."""
    scale = P.choose_qparams_symmetric_mse(w_group.float(), (1, w_group.shape[1]))
    scale = scale.to(torch.float16).float().clamp(min=P.SCALE_EPS)
    zero_point = torch.full_like(scale, 8, dtype=torch.int32)
    return gptq.Int4GroupParams(scale, zero_point, torch.full_like(scale, -8.0), torch.full_like(scale, 7.0))
