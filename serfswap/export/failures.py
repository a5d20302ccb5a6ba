"""How an export's failures read: the exporters' and onnxruntime's error text cut to one line
(no terminal colours, object addresses or C++ source paths), and the failure of one shape plan,
turned into serfswap's own error when no plan is left."""

from __future__ import annotations

import re

from ..errors import ExportFailedError, ExportMismatchError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """The first line of an error, without terminal colours and object addresses. torch's
    exporter says only which step failed ("Failed to export the model with torch.export.
    This is step 1/3 ..."); the cause it chains is what the user needs, so it follows."""
    text = _ANSI.sub("", str(exc)).strip()
    text = re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"\1", text)
    line = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and " This is step " in line:
        line = line.split(" This is step ")[0].rstrip(".") + ": " + one_line(cause)
    return line


def short_ort(exc: BaseException) -> str:
    """onnxruntime's message without its prefix and source paths: the node and the shapes."""
    text = one_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"(?:void |bool )?onnxruntime::[\w:]+\([^)]*\)\s*", "", text)  # C++ names
    return re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)


class ShapeMismatchError(ExportMismatchError):
    """An output of another shape than torch's: a shape baked in at export, which static
    shapes (not a tolerance) may get past."""


class AttemptFailed(Exception):
    """One shape plan failed in a way another plan may not: the exporter, onnx.checker,
    onnxruntime or verification."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error

    def error_with(self, before: list[str], *, dynamic: bool) -> Exception:
        """The error to raise when no plan is left: serfswap's own kind where it was one.
        ``dynamic``: every plan tried had dynamic axes, so static shapes are worth a try."""
        message = self.reason + (f" (before: {'; '.join(before)})" if before else "")
        if isinstance(self.error, ExportMismatchError) and not isinstance(
            self.error, ShapeMismatchError
        ):  # numbers that differ are no matter of shapes: static shapes compute the same
            return ExportMismatchError(
                message + "; if the difference is acceptable for your use, set --atol/--rtol"
            )
        if dynamic:
            message += "; try --static"
        return ExportFailedError(message)
