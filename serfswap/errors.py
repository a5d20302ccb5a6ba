"""The exceptions serfswap raises.

Every error derives from :class:`SerfswapError`, so ``except serfswap.SerfswapError`` catches
all of them, and also from the builtin that matches its meaning, so code that already catches
``TypeError`` or ``ValueError`` keeps working. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple


class _Named:
    """The value of an option a message names without a value ("name them in include=")."""

    def __repr__(self) -> str:
        return "NAMED"


NAMED = _Named()


class Words(NamedTuple):
    """A phrase that the API and the command line say differently, in a message template:
    ``Words("the plan", "`serfswap inspect`")``."""

    api: str
    cli: str


class _Spelling(string.Formatter):
    """Renders a message's option fields in the API's words (``activations=['relu']``,
    ``include=``) or the command line's (``--activations relu``, ``--include``).

    A field is ``{label}`` or ``{label:option}``: ``label`` names a value given with the error
    (:data:`NAMED` for an option named without one), ``option`` the option when the label is
    not its name (one option may appear with two values in one message)."""

    def __init__(self, cli: bool) -> None:
        self.cli = cli

    def get_value(self, key: int | str, args: Any, kwargs: Any) -> Any:
        return key, kwargs[key]

    def format_field(self, field: tuple[str, object], spec: str) -> str:
        label, value = field
        if isinstance(value, Words):
            return value.cli if self.cli else value.api
        name = spec or label
        if not self.cli:
            return f"{name}=" if value is NAMED else f"{name}={value!r}"
        flag = "--" + name.replace("_", "-")
        if value is NAMED:
            return flag
        if isinstance(value, list | tuple):
            return f"{flag} {' '.join(map(str, value))}"
        return f"{flag} {value}"


class SerfswapError(Exception):
    """Base class of every error raised by serfswap.

    ``exit_code`` is the command line's status for it: 2 when the command itself is wrong (an
    option, a path, a missing argument), 1 when a valid request failed.

    ``option`` is the option the error concerns (the API's keyword, ``"lr"``, or the command
    line's flag, ``"--lr"``), set where the error is raised. A message that names options is a
    template with ``values``: ``{activations}`` (with ``activations=`` among the keywords) reads
    ``activations=['gelu']`` in ``str(error)`` and ``--activations gelu`` in
    :meth:`cli_message`, so the command line says it in the words the user typed without
    rewriting text. A message is a template when values are given (literal braces doubled);
    ``include=NAMED`` names an option bare, a :class:`Words` value is a phrase said differently.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, option: str | None = None, **values: object):
        self.option = option
        self.template = message
        self.values = values
        super().__init__(self._render(cli=False))

    def _render(self, *, cli: bool) -> str:
        if not self.values:
            return self.template
        return _Spelling(cli).vformat(self.template, (), self.values)

    def cli_message(self) -> str:
        """The message as the command line says it: options as flags."""
        if self.args != (self._render(cli=False),):  # args replaced after raising: plain text
            return str(self)
        return self._render(cli=True)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error or report says of a library's multi-line failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def install_hint(extra: str) -> str:
    """How to install what an optional extra of serfswap brings (``[hf]``, ``[timm]``...)."""
    return f"pip install 'serfswap[{extra}]'"


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
