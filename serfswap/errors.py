"""The exceptions serfswap raises.

Every error derives from :class:`SerfswapError`, so ``except serfswap.SerfswapError`` catches
all of them, and also from the builtin that matches its meaning, so code that already catches
``TypeError`` or ``ValueError`` keeps working. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class SerfswapError(Exception):
    """Base class of every error raised by serfswap.

    ``exit_code`` is the command line's status for it: 2 when the command itself is wrong (an
    option, a path, a missing argument), 1 when a valid request failed.
    """

    exit_code = 1


class UnsupportedDtypeError(SerfswapError, TypeError):
    """A tensor has a dtype the operation cannot compute in (an integer tensor given to Serf)."""


class InvalidActivationsError(SerfswapError, ValueError):
    """``activations=`` names something that is not a replaceable activation family or class."""

    exit_code = 2


class NothingToConvertError(SerfswapError, ValueError):
    """convert() found nothing to replace: no activation, or every one filtered out."""

    exit_code = 2


class InvalidArgumentError(SerfswapError, TypeError):
    """An option has the wrong type: a pattern that is not a string, a filter not callable."""

    exit_code = 2


class InvalidChoiceError(SerfswapError, ValueError):
    """An option has a value outside the ones it takes (a device name, a choice of a list)."""

    exit_code = 2


class CheckpointError(SerfswapError, ValueError):
    """A recovery checkpoint cannot be read, or belongs to another run (other steps, model)."""


class ExampleInputsError(SerfswapError, ValueError):
    """Example inputs cannot be inferred for a model (a plain module), or have the wrong form."""

    exit_code = 2


class ExportError(SerfswapError, ValueError):
    """The export cannot be made as asked: bad option, missing inputs, unwritable target."""

    exit_code = 2


class PartialConversionError(SerfswapError, RuntimeError):
    """``convert(..., strict=True)``: activations that were to be converted still run (or the
    run-time audit that would show it could not run)."""


class ShapeMismatchError(SerfswapError, ValueError):
    """Tensors that must have one shape do not (a gradient and its input, in a kernel call)."""


class TaskError(ExportError):
    """The model cannot be exported for the task asked (``--task text-generation-with-past`` on
    an encoder or a timm model): a usage error, status 2."""


class ExportFailedError(ExportError):
    """No shape plan could be exported and verified: the exporter, onnx.checker or onnxruntime
    failed on the model (a valid request that failed, hence status 1)."""

    exit_code = 1


class ExportMismatchError(ExportError, AssertionError):
    """onnxruntime and torch disagree beyond the tolerance; nothing was written. An ExportError
    (every failure of an export is one) and an AssertionError, as before; status 1."""

    exit_code = 1


class ModelLoadError(SerfswapError, ValueError):
    """MODEL cannot be loaded: corrupt, of an unknown form, mismatched, or unsafe to load."""


class ModelSpecError(ModelLoadError):
    """MODEL or --arch is wrong on the command line: no such path, unknown architecture."""

    exit_code = 2


class NoDeviceError(SerfswapError, RuntimeError):
    """device="cuda" was asked for, and onnxruntime has no usable CUDA provider."""
