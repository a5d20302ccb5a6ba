"""The ONNX side of serfswap: Serf decompositions, graph checks, onnxruntime sessions and
greedy generation with an exported decoder.

Imports onnx, onnxscript and onnxruntime, so ``import serfswap`` does not import this package.
"""

from ..decompositions import DECOMPOSITIONS, PATTERNS
from .generate import generate
from .graph import GraphCheck, check_graph
from .session import NoDeviceError, session
from .translation import translation_table

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
