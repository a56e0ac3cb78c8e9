"""quantrt: a compile-first quantized inference runtime for PyTorch transformers."""

from .autoquant import AutoquantPlan
from .calibrate import calibrate
from .compile import RecompileError
from .config import QuantConfig
from .integrations import install_import_hooks
from .interop import to_quant_config
from .modules import LayerReport, QuantizedLinear, quantize_
from .pipelines import quantize_pipeline
from .schemes import Scheme, resolve_scheme
from .transformer import QuantizedTransformer, autoquant
from .version import __version__

# diffusers' and transformers' loaders take QuantConfig once they are imported (quantrt.integrations)
install_import_hooks()

__all__ = ["AutoquantPlan", "QuantConfig", "QuantizedLinear", "QuantizedTransformer", "LayerReport", "RecompileError", "Scheme", "calibrate",
           "quantize_", "quantize_pipeline", "resolve_scheme", "to_quant_config", "autoquant", "__version__"]
