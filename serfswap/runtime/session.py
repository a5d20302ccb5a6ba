"""onnxruntime sessions for exported models, on the GPU when one can be used."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidChoiceError, NoDeviceError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("serfswap")

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def session(
    path: str | os.PathLike[str],
    device: str = "auto",
    *,
    threads: int | None = None,
    log_severity: int | None = None,
) -> onnxruntime.InferenceSession:
    """An ``onnxruntime.InferenceSession`` for ``path``.

    ``device``: ``"auto"`` takes CUDA when onnxruntime-gpu sees a GPU, else the CPU; ``"cpu"``;
    ``"cuda"`` (an error when unavailable). The choice is logged, and is
    ``sess.get_providers()[0]``. ``threads`` sets intra-op threads (default: onnxruntime's).
    ``log_severity``: onnxruntime's log level for this session (0 verbose ... 4 fatal only).
    """
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise InvalidChoiceError(f"device={device!r}: use 'auto', 'cpu' or 'cuda'")
    available = ort.get_available_providers()
    if device == "cuda" and _CUDA not in available:
        raise NoDeviceError(
            f"device='cuda' but onnxruntime offers only {available}; install onnxruntime-gpu"
        )
    providers = [_CUDA, _CPU] if device != "cpu" and _CUDA in available else [_CPU]
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if log_severity is not None:
        options.log_severity_level = log_severity
    sess = ort.InferenceSession(str(Path(path)), sess_options=options, providers=providers)
    log.info("onnxruntime session for %s on %s", path, sess.get_providers()[0])
    return sess
