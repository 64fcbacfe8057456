"""Work-arounds for bugs in the libraries autoq's checkpoints meet. Each one changes behaviour only
where the bug shows, so it turns into a no-op once the library is fixed.

compressed-tensors 0.20 (as used by transformers 5.24): to load a checkpoint, transformers builds
compressed modules on the meta device through ``PackedQuantizationCompressor.compress``, which
on meta leaves an asymmetric zero point unpacked (``[N, groups]`` int8), while the same
compressor writes checkpoints — and vLLM reads them — with the zero point packed
(``[N / 8, groups]`` int32). Every asymmetric int4 checkpoint, compressed-tensors' own included,
then fails to load with a size mismatch. The fix gives those meta tensors the packed shape.

It is applied when compressed-tensors is imported after ``import autoq`` (a post-import hook,
so ``import autoq`` does not pay for importing compressed-tensors), or at once if it already was.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys

import torch

PACK_QUANTIZED_MODULE = "compressed_tensors.compressors.pack_quantized.base"


def patch_pack_quantized(module) -> None:
    cls = module.PackedQuantizationCompressor
    if getattr(cls, "_autoq_packs_meta_zero_point", False):
        return
    original = cls.compress.__func__

    def compress(klass, state_dict, scheme):
        out = original(klass, state_dict, scheme)
        zero_point = out.get("weight_zero_point")
        if zero_point is not None and zero_point.device.type == "meta" and zero_point.dtype != torch.int32:
            rows = math.ceil(zero_point.shape[0] * scheme.weights.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, zero_point.shape[1]), dtype=torch.int32, device="meta")
        return out

    cls.compress = classmethod(compress)
    cls._autoq_packs_meta_zero_point = True
    cls._autoq_original_compress = classmethod(original)


def plain_transformers_loads_asymmetric_int4() -> bool:
    """Whether the installed compressed-tensors (without autoq's fix) builds asymmetric int4
    layers with packed zero points, i.e. whether a process that never imports autoq can load
    an asymmetric int4 checkpoint. Checked by running its compressor on meta tensors."""
    from compressed_tensors.compressors.pack_quantized import base
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    cls = base.PackedQuantizationCompressor
    compress = getattr(cls, "_autoq_original_compress", cls.compress)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))
    state = {"weight": torch.empty(16, 64, device="meta"),
             "weight_scale": torch.empty(16, 2, device="meta"),
             "weight_zero_point": torch.empty(16, 2, dtype=torch.int8, device="meta")}
    try:
        out = compress(state, scheme)  # a classmethod, bound through the class
    except Exception:  # noqa: BLE001 - an API we do not know: assume it cannot
        return False
    zero_point = out.get("weight_zero_point")
    return zero_point is None or zero_point.dtype == torch.int32


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch_pack_quantized`` right after compressed-tensors' module executes."""

    def find_spec(self, name, path, target=None):
        if name != PACK_QUANTIZED_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_pack_quantized(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if PACK_QUANTIZED_MODULE in sys.modules:
        patch_pack_quantized(sys.modules[PACK_QUANTIZED_MODULE])
    elif importlib.util.find_spec("compressed_tensors") is not None:
        if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchAfterImport())
