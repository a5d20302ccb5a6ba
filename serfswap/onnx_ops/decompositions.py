"""Serf as standard ONNX ops, for the dynamo exporter's ``custom_translation_table``.

Two decompositions, both in the default ONNX domain only (no custom op, no custom domain):

* ``softplus`` (default): ``Mul(x, Erf(Softplus(x)))``, exactly three nodes. Softplus is accurate
  everywhere in onnxruntime, but its CPU kernel is scalar (about 6.6 ns per element).
* ``exp-log``: ``Mul(x, Erf(Log(Add(Exp(x), 1))))``, five nodes, all vectorised on onnxruntime's
  CPU (about 4x faster than Softplus there). It needs no clamp: for large x, Exp overflows to
  inf, Log(inf) = inf, Erf(inf) = 1, and the result is x; max abs error 1.1e-6 vs Softplus.

Both give NaN at x = -inf, as the torch op does (``-inf * erf(0)``).

float16 and bfloat16 inputs are cast to float32 around the decomposition: onnxruntime's CUDA
Softplus is ``log(exp(x) + 1)`` in the input type and returns 0 below x = -7.6 in float16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxscript import opset18 as op  # the lowest opset serfswap writes: every op here is in it

_FLOAT = 1  # onnx.TensorProto.FLOAT
_HALF_TYPES = {10, 16}  # FLOAT16, BFLOAT16


def _in_float32(decomposition: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Run ``decomposition`` in float32 for half-type inputs, and cast the result back."""

    def translate(x: Any) -> Any:
        dtype = getattr(getattr(x, "dtype", None), "value", None)
        if dtype not in _HALF_TYPES:
            return decomposition(x)
        return op.Cast(decomposition(op.Cast(x, to=_FLOAT)), to=dtype)

    translate.__name__ = decomposition.__name__
    return translate


@_in_float32
def serf_softplus(x: Any) -> Any:
    # Serf(x) = x * erf(softplus(x))
    softplus = op.Softplus(x)
    return op.Mul(x, op.Erf(softplus))


@_in_float32
def serf_exp_log(x: Any) -> Any:
    # Serf(x) = x * erf(log(exp(x) + 1)); exp overflow is harmless: erf(inf) = 1
    one = op.CastLike(1.0, x)
    softplus = op.Log(op.Add(op.Exp(x), one))
    return op.Mul(x, op.Erf(softplus))


DECOMPOSITIONS: dict[str, Callable[[Any], Any]] = {
    "softplus": serf_softplus,
    "exp-log": serf_exp_log,
}

# The op types of each decomposition, in order from the input: what the graph check looks for.
PATTERNS: dict[str, tuple[str, ...]] = {
    "softplus": ("Softplus", "Erf", "Mul"),
    "exp-log": ("Exp", "Add", "Log", "Erf", "Mul"),
}


def translation_table(decomposition: str = "softplus") -> dict[Any, Callable[[Any], Any]]:
    """The ``custom_translation_table`` that exports ``serfswap::serf`` as ``decomposition``."""
    import torch

    import serfswap.serf  # noqa: F401  (registers torch.ops.serfswap)

    return {torch.ops.serfswap.serf.default: DECOMPOSITIONS[decomposition]}
