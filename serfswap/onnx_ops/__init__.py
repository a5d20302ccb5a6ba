"""The ONNX side of serfswap: Serf decompositions, graph checks, onnxruntime sessions.

Imports onnx, onnxscript and onnxruntime, so ``import serfswap`` does not import this package.
"""

from .decompositions import DECOMPOSITIONS, PATTERNS, translation_table
from .graph import GraphCheck, check_graph
from .session import NoDeviceError, session

__all__ = [
    "DECOMPOSITIONS",
    "PATTERNS",
    "GraphCheck",
    "NoDeviceError",
    "check_graph",
    "session",
    "translation_table",
]
