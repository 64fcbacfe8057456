"""autoq: automatic per-layer quantization search for PyTorch models."""

from autoq import formats
from autoq.api import apply, resolve, search
from autoq.cache import PlanCache
from autoq.checkpoint import load_quantized, save_quantized
from autoq.config import SearchConfig
from autoq.modules import QuantizedLinear
from autoq.pipeline import autoquant, quantize
from autoq.plan import Plan
from autoq.swap import layer_formats, quantizable_layers

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "PlanCache",
    "QuantizedLinear",
    "SearchConfig",
    "apply",
    "autoquant",
    "formats",
    "layer_formats",
    "load_quantized",
    "quantizable_layers",
    "quantize",
    "resolve",
    "save_quantized",
    "search",
]
