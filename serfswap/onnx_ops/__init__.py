"""Serf as ONNX ops: the decompositions (as data), their onnxscript translation for the exporter,
the graph checks that find and verify them, and the folding into ONNX functions.

Imports onnx and onnxscript only when a name that needs them is used: the command line reads
:mod:`.decompositions` for its choices. ``session`` and ``generate`` (moved to
:mod:`serfswap.runtime`) are still served here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .decompositions import DECOMPOSITIONS, PATTERNS

if TYPE_CHECKING:
    from ..runtime import NoDeviceError, generate, session
    from .graph import GraphCheck, check_graph
    from .translation import translation_table

_LAZY = {
    "GraphCheck": ".graph",
    "check_graph": ".graph",
    "translation_table": ".translation",
    "NoDeviceError": "..runtime",
    "generate": "..runtime",
    "session": "..runtime",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "DECOMPOSITIONS",
    "PATTERNS",
    "GraphCheck",
    "NoDeviceError",
    "check_graph",
    "generate",
    "session",
    "translation_table",
]
