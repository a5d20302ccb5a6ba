"""serfswap: put the Serf activation into models you already have.

``import serfswap`` is cheap: it imports torch and nothing else heavy (no onnx, onnxruntime,
timm or transformers), and it does not initialise CUDA. It registers Serf as "serf" in timm and
transformers, when and if those are imported.
"""

from . import integrations as _integrations
from ._version import __version__
from .convert import convert, plan, revert
from .errors import (
    CheckpointError,
    ExampleInputsError,
    ExportError,
    ExportFailedError,
    ExportMismatchError,
    InvalidActivationsError,
    InvalidArgumentError,
    InvalidChoiceError,
    ModelLoadError,
    ModelSpecError,
    NoDeviceError,
    NothingToConvertError,
    PartialConversionError,
    SerfswapError,
    TaskError,
    UnsupportedDtypeError,
)
from .export import (
    ExportReport,
    Verification,
    export_onnx,
    verify_onnx,
)
from .recover import RecoveryOptions, RecoveryResult, recover
from .report import Plan, Site
from .serf import Serf, keep_custom_op, serf

_integrations.register()


def __getattr__(name: str) -> object:
    # The ONNX side and the loaders import onnx / onnxruntime / safetensors: load them on use.
    import importlib

    if name in ("onnx_ops", "io"):
        return importlib.import_module(f".{name}", __name__)
    if name in ("save_checkpoint", "load_checkpoint"):
        return getattr(importlib.import_module(".io", __name__), name)
    raise AttributeError(f"module 'serfswap' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ExampleInputsError",
    "ExportError",
    "ExportFailedError",
    "ExportMismatchError",
    "ExportReport",
    "InvalidActivationsError",
    "InvalidArgumentError",
    "InvalidChoiceError",
    "ModelLoadError",
    "ModelSpecError",
    "NoDeviceError",
    "NothingToConvertError",
    "PartialConversionError",
    "Plan",
    "RecoveryOptions",
    "RecoveryResult",
    "Serf",
    "SerfswapError",
    "Site",
    "TaskError",
    "UnsupportedDtypeError",
    "Verification",
    "__version__",
    "convert",
    "export_onnx",
    "keep_custom_op",
    "load_checkpoint",
    "plan",
    "recover",
    "revert",
    "save_checkpoint",
    "serf",
    "verify_onnx",
]
