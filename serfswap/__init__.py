"""serfswap: put the Serf activation into models you already have.

``import serfswap`` is cheap: it imports torch and nothing else heavy (no onnx, onnxruntime,
timm or transformers), and it does not initialise CUDA. It registers Serf as "serf" in timm and
transformers, when and if those are imported.
"""

__version__ = "0.1.0"

from . import integrations as _integrations  # noqa: E402
from .convert import convert, plan, revert  # noqa: E402
from .errors import (  # noqa: E402
    InvalidActivationsError,
    NothingToConvertError,
    SerfswapError,
    UnsupportedDtypeError,
)
from .report import Plan, Site  # noqa: E402
from .serf import Serf, serf  # noqa: E402

_integrations.register()

__all__ = [
    "InvalidActivationsError",
    "NothingToConvertError",
    "Plan",
    "Serf",
    "SerfswapError",
    "Site",
    "UnsupportedDtypeError",
    "__version__",
    "convert",
    "plan",
    "revert",
    "serf",
]
