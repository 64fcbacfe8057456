"""autoq: automatic per-layer quantization search for PyTorch models."""

from autoq import formats
from autoq.checkpoint import load_quantized, save_quantized
from autoq.modules import QuantizedLinear
from autoq.swap import apply, layer_formats, quantizable_layers

__version__ = "0.1.0"

__all__ = [
    "QuantizedLinear",
    "apply",
    "formats",
    "layer_formats",
    "load_quantized",
    "quantizable_layers",
    "save_quantized",
]
