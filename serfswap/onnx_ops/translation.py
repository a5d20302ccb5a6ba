"""Serf as standard ONNX ops, for the dynamo exporter's ``custom_translation_table``: the
onnxscript function of each decomposition, built from its record's steps
(:mod:`serfswap.onnx_ops.decompositions`, where the decompositions and their trade-offs are
described).

float16 and bfloat16 inputs are cast to float32 around the decomposition: onnxruntime's CUDA
Softplus is ``log(exp(x) + 1)`` in the input type and returns 0 below x = -7.6 in float16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript

from ..options import OPSETS
from .decompositions import DECOMPOSITIONS, DEFAULT, ONE, Decomposition, X

# The lowest opset serfswap writes: every op of every decomposition is in it.
op = getattr(onnxscript, f"opset{OPSETS.start}")
_FLOAT = 1  # onnx.TensorProto.FLOAT
_HALF_TYPES = {10, 16}  # FLOAT16, BFLOAT16


def onnxscript_function(decomposition: Decomposition) -> Callable[[Any], Any]:
    """The onnxscript function that computes ``decomposition``'s steps from x, traced by the
    exporter: one ONNX node per step, in order, each reading x, the constant 1 (CastLike to
    x's type) or an earlier step's result."""

    def steps(x: Any) -> Any:
        leaves = {X: x, ONE: op.CastLike(1.0, x) if decomposition.needs_one else None}
        results: list[Any] = []
        for step in decomposition.steps:
            args = [results[i] if isinstance(i, int) else leaves[i] for i in step.inputs]
            results.append(getattr(op, step.op)(*args))
        return results[-1]

    def translate(x: Any) -> Any:
        # Serf(x) = the record's formula, in float32 for half-type inputs, cast back after.
        dtype = getattr(getattr(x, "dtype", None), "value", None)
        if dtype not in _HALF_TYPES:
            return steps(x)
        return op.Cast(steps(op.Cast(x, to=_FLOAT)), to=dtype)

    translate.__name__ = f"serf_{decomposition.name.replace('-', '_')}"
    return translate


def translation_table(decomposition: str = DEFAULT) -> dict[Any, Callable[[Any], Any]]:
    """The ``custom_translation_table`` that exports ``serfswap::serf`` as ``decomposition``."""
    import torch

    import serfswap.ops.serf  # noqa: F401  (registers torch.ops.serfswap)

    return {torch.ops.serfswap.serf.default: onnxscript_function(DECOMPOSITIONS[decomposition])}
