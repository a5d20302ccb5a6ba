"""serfswap: put the Serf activation into models you already have.

``import serfswap`` is cheap: it imports nothing heavy (torch when a name that needs it is
first used; onnx, onnxruntime, timm or transformers only when used), and it does not initialise
CUDA. It registers Serf as "serf" in timm and transformers, when and if those are imported.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import _legacy
from ._version import __version__
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
from .rewrite import registration as _registration

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from .export.pipeline import export_onnx
    from .export.report import ExportReport
    from .export.verification import Verification, verify_onnx
    from .io.checkpoint import load_checkpoint, save_checkpoint
    from .ops.serf import Serf, keep_custom_op, serf
    from .recovery.loop import RecoveryOptions, RecoveryResult, recover
    from .rewrite.convert import convert, plan, revert
    from .rewrite.report import Plan, Site

# The public names that need torch, and the module each lives in: imported on first use, so
# that `import serfswap` (and so the `serfswap` command, before it has checked its arguments)
# costs no torch import. The ONNX side and the loaders come the same way.
_LAZY = {
    "convert": "rewrite.convert",
    "plan": "rewrite.convert",
    "revert": "rewrite.convert",
    "ExportReport": "export.report",
    "Verification": "export.verification",
    "export_onnx": "export.pipeline",
    "verify_onnx": "export.verification",
    "RecoveryOptions": "recovery.loop",
    "RecoveryResult": "recovery.loop",
    "recover": "recovery.loop",
    "Plan": "rewrite.report",
    "Site": "rewrite.report",
    "Serf": "ops.serf",
    "keep_custom_op": "ops.serf",
    "serf": "ops.serf",
    "save_checkpoint": "io.checkpoint",
    "load_checkpoint": "io.checkpoint",
}
# The stage subpackages, reachable as attributes (``serfswap.io.load_model``).
_SUBPACKAGES = frozenset(
    {"cli", "export", "io", "onnx_ops", "ops", "recovery", "rewrite", "runtime"}
)
# Submodules named like a function of the package: the package's attribute is the function.
_SHADOWED = frozenset({"convert", "recover", "serf"})


def __getattr__(name: str) -> object:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'serfswap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package module: importing ``serfswap.convert`` (the submodule) must not replace the
    function ``serfswap.convert``, as the import system does by setting the parent's
    attribute. The function was the attribute when the package imported it eagerly; it stays."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_legacy.install()
_registration.register()


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
