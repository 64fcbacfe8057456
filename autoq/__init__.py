"""autoq: automatic per-layer quantization search for PyTorch models."""

from autoq import formats
from autoq.api import autoquant, resolve, search
from autoq.cache import PlanCache
from autoq.checkpoint import load_quantized, save_quantized
from autoq.modules import QuantizedLinear
from autoq.plan import Plan
from autoq.swap import apply, layer_formats, quantizable_layers

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "PlanCache",
    "QuantizedLinear",
    "apply",
    "autoquant",
    "formats",
    "layer_formats",
    "load_quantized",
    "quantizable_layers",
    "resolve",
    "save_quantized",
    "search",
]
