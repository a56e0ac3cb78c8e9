"""quantrt: a compile-first quantized inference runtime for PyTorch transformers."""

from importlib.metadata import PackageNotFoundError, version as _version

from .autoquant import AutoquantPlan, autoquant
from .calibrate import calibrate
from .compile import RecompileError
from .config import QuantConfig
from .interop import quantize_pipeline, to_quant_config
from .modules import LayerReport, QuantizedLinear, quantize_
from .schemes import Scheme, resolve_scheme
from .transformer import QuantizedTransformer

try:
    __version__ = _version("quantrt")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["AutoquantPlan", "QuantConfig", "QuantizedLinear", "QuantizedTransformer", "LayerReport", "RecompileError", "Scheme", "calibrate",
           "quantize_", "quantize_pipeline", "resolve_scheme", "to_quant_config", "autoquant", "__version__"]
