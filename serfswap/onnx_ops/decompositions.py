"""How Serf is written in standard ONNX ops: one record per decomposition, as data.

Each record is the one source of what its decomposition is: the exporter's translation
(:mod:`serfswap.onnx_ops.translation` builds the onnxscript function from the steps), the
graph check (:func:`serfswap.onnx_ops.graph.find_serf` walks the steps backwards from the
result), the folding into a ``serfswap.Serf`` function (its body is the steps) and the CLI's
``--decomposition`` choices all read it. This module imports nothing heavy, so ``serfswap
--help`` lists the choices without importing onnx or onnxscript.

Both decompositions are in the default ONNX domain only (no custom op, no custom domain):

* ``softplus`` (default): ``Mul(x, Erf(Softplus(x)))``, exactly three nodes. Softplus is accurate
  everywhere in onnxruntime, but its CPU kernel is scalar (about 6.6 ns per element).
* ``exp-log``: ``Mul(x, Erf(Log(Add(Exp(x), 1))))``, five nodes, all vectorised on onnxruntime's
  CPU (about 4x faster than Softplus there). It needs no clamp: for large x, Exp overflows to
  inf, Log(inf) = inf, Erf(inf) = 1, and the result is x; max abs error 1.1e-6 vs Softplus.

Both give NaN at x = -inf, as the torch op does (``-inf * erf(0)``).
"""

from __future__ import annotations

from dataclasses import dataclass

X = "x"  # a step input: the value Serf activates
ONE = "one"  # a step input: the constant 1, of x's type
COMMUTATIVE = frozenset({"Add", "Mul"})  # the graph check tries both orders of their inputs


@dataclass(frozen=True)
class Step:
    """One node: its ONNX op type and its inputs, each ``X``, ``ONE`` or the index of an
    earlier step (whose output it reads). The last step's output is Serf(x)."""

    op: str
    inputs: tuple[str | int, ...]


@dataclass(frozen=True)
class Decomposition:
    """A way to write Serf in standard ONNX ops: its ``--decomposition`` name, the formula
    (for help texts and comments), the steps from the input, and why to pick it."""

    name: str
    formula: str
    steps: tuple[Step, ...]
    use: str

    @property
    def ops(self) -> tuple[str, ...]:
        """The op types of the steps, in order from the input."""
        return tuple(step.op for step in self.steps)

    @property
    def needs_one(self) -> bool:
        """Whether a step reads the constant 1 (a Constant node in a function body)."""
        return any(ONE in step.inputs for step in self.steps)


DECOMPOSITIONS: dict[str, Decomposition] = {
    d.name: d
    for d in (
        Decomposition(
            "softplus",
            "x * erf(softplus(x))",
            (Step("Softplus", (X,)), Step("Erf", (0,)), Step("Mul", (X, 1))),
            "exact, and fast where Softplus has a fast kernel (CUDA)",
        ),
        Decomposition(
            "exp-log",
            "x * erf(log(exp(x) + 1)); exp overflow is harmless: erf(inf) = 1",
            (
                Step("Exp", (X,)),
                Step("Add", (0, ONE)),
                Step("Log", (1,)),
                Step("Erf", (2,)),
                Step("Mul", (X, 3)),
            ),
            "faster on onnxruntime's CPU, whose Softplus kernel is scalar",
        ),
    )
}
DEFAULT = "softplus"

# The faster exact decomposition where the file will run (issue #30, onnxruntime 1.32):
# onnxruntime's CPU Softplus is a scalar loop (52 ms of all-MiniLM-L6-v2's 182 at batch 8 x 128,
# 2 threads), while Exp, Log and Erf are vectorised: exp-log ran MiniLM at 1.08x the original
# against 1.50x for softplus. onnxruntime's CUDA Softplus is one fused elementwise kernel, so the
# three-node softplus pattern is the one to keep there.
TARGETS: dict[str, str] = {"cpu": "exp-log", "cuda": "softplus"}


def choose(decomposition: str | None, target: str | None) -> str:
    """The decomposition to write: ``decomposition`` when given, else ``target``'s
    (:data:`TARGETS`), else :data:`DEFAULT`. Both given must agree: a file for the CPU written
    with softplus would be a silent 1.4x slowdown, so the conflict is an error
    (:class:`ValueError`; callers raise their own kind with the option named)."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"target={target!r}: use one of {sorted(TARGETS)}")
    if decomposition is not None and decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition={decomposition!r}: use one of {sorted(DECOMPOSITIONS)}")
    if decomposition is not None and target is not None and TARGETS[target] != decomposition:
        raise ValueError(
            f"decomposition={decomposition!r} and target={target!r} disagree ({target} uses "
            f"{TARGETS[target]!r}): give one of them"
        )
    if decomposition is not None:
        return decomposition
    return TARGETS[target] if target is not None else DEFAULT


# The op types of each decomposition, in order from the input (read from the records).
PATTERNS: dict[str, tuple[str, ...]] = {name: d.ops for name, d in DECOMPOSITIONS.items()}

__all__ = [
    "COMMUTATIVE",
    "DECOMPOSITIONS",
    "DEFAULT",
    "ONE",
    "PATTERNS",
    "TARGETS",
    "Decomposition",
    "Step",
    "X",
    "choose",
]
