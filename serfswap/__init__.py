"""serfswap: put the Serf activation into models you already have.

``import serfswap`` is cheap: it imports torch and nothing else heavy (no onnx, onnxruntime,
timm or transformers), and it does not initialise CUDA.
"""

from .errors import SerfswapError, UnsupportedDtypeError
from .serf import Serf, serf

__version__ = "0.1.0"

__all__ = ["Serf", "SerfswapError", "UnsupportedDtypeError", "__version__", "serf"]
