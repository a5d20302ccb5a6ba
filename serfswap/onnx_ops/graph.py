"""Graph checks on an exported ONNX model: how many Serf decompositions it holds, each verified
against its exact pattern, and which original activations are still in it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from .decompositions import COMMUTATIVE, DECOMPOSITIONS, ONE, Decomposition, X

# Op types that are themselves one of the activations serfswap replaces.
_ACTIVATION_OPS = {
    "Relu", "Gelu", "FastGelu", "BiasGelu", "Mish", "Elu", "Selu", "Celu", "LeakyRelu",
    "HardSwish", "PRelu", "ThresholdedRelu",
}  # fmt: skip
_STANDARD_DOMAINS = {"", "ai.onnx"}


@dataclass
class GraphCheck:
    """``serf``: decompositions found per kind (a call of a model-local Serf function counts as
    its body's kind); ``leftovers``: original activations by kind; ``custom_domains``: domains
    outside the ONNX standard and not defined by the model's own functions (there should be
    none); ``bad_functions``: model-local functions named like Serf whose body is not exactly
    one decomposition."""

    serf: Counter[str] = field(default_factory=Counter)
    leftovers: Counter[str] = field(default_factory=Counter)
    custom_domains: list[str] = field(default_factory=list)
    bad_functions: list[str] = field(default_factory=list)

    @property
    def serf_total(self) -> int:
        return sum(self.serf.values())


@dataclass(frozen=True)
class SerfMatch:
    """One decomposition found in a graph: its kind, its nodes from the input side, the name of
    the value it activates and of its result, and the name of the constant 1 (``exp-log``)."""

    kind: str
    nodes: tuple[onnx.NodeProto, ...]
    x: str
    y: str
    one: str | None = None


def scalar_constants(
    initializers: Sequence[onnx.TensorProto], nodes: Sequence[onnx.NodeProto], base_dir: str
) -> dict[str, float]:
    """Scalar constants (initializers and Constant nodes), by output name.

    Only one-element tensors are read, from the side file when the weights are external.
    """
    values: dict[str, float] = {}
    tensors = [(init.name, init) for init in initializers]
    for node in nodes:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors.append((node.output[0], attr.t))
    for name, tensor in tensors:
        if math.prod(tensor.dims) == 1:
            values[name] = float(numpy_helper.to_array(tensor, base_dir).reshape(-1)[0])
    return values


Binding = dict[str | int, str | onnx.NodeProto]  # X / ONE -> value name, step index -> node


def _match_step(
    record: Decomposition,
    index: int,
    value: str,
    producer: dict[str, onnx.NodeProto],
    constants: dict[str, float],
    bound: Binding,
) -> Binding | None:
    """``bound`` extended so that step ``index`` of ``record`` is the node producing ``value``
    and its inputs match the step's recursively (x the same value everywhere, the constant 1 a
    scalar constant equal to 1), or None. Add and Mul are tried in both input orders."""
    node = producer.get(value)
    step = record.steps[index]
    if node is None or node.op_type != step.op or len(node.input) != len(step.inputs):
        return None
    orders = [tuple(node.input)]
    if step.op in COMMUTATIVE:
        orders.append(tuple(reversed(node.input)))
    for order in orders:
        attempt: Binding | None = {**bound, index: node}
        for ref, name in zip(step.inputs, order, strict=True):
            if attempt is None:
                break
            if isinstance(ref, int):
                attempt = _match_step(record, ref, name, producer, constants, attempt)
            elif (ref == ONE and constants.get(name) != 1.0) or attempt.setdefault(
                ref, name
            ) != name:
                attempt = None
        if attempt is not None:
            return attempt
    return None


def find_serf(nodes: Sequence[onnx.NodeProto], constants: dict[str, float]) -> list[SerfMatch]:
    """Every Serf decomposition among ``nodes``: from each node, each record's steps
    (:data:`serfswap.decompositions.DECOMPOSITIONS`) matched backwards from its last one.

    Pass a list, not a protobuf repeated field: callers compare nodes by id(), and protobuf
    makes a new wrapper object on each access unless one is still referenced.
    """
    producer = {out: node for node in nodes for out in node.output}
    matches = []
    for node in nodes:
        for record in DECOMPOSITIONS.values():
            last = len(record.steps) - 1
            if node.op_type != record.steps[last].op:
                continue
            bound = _match_step(record, last, node.output[0], producer, constants, {})
            if bound is not None:
                found = tuple(bound[i] for i in range(len(record.steps)))
                one = bound.get(ONE)
                matches.append(SerfMatch(record.name, found, bound[X], node.output[0], one))
                break
    return matches


def serf_function_kind(function: onnx.FunctionProto) -> str | None:
    """The decomposition a model-local function computes, or None when its body is anything
    else than exactly one decomposition (plus the Constant it needs) from input to output."""
    body = list(function.node)
    matches = find_serf(body, scalar_constants([], body, ""))
    if len(function.input) != 1 or len(function.output) != 1 or len(matches) != 1:
        return None
    match = matches[0]
    inside = {id(n) for n in match.nodes}
    rest = [n for n in body if id(n) not in inside]
    if (
        (match.x, match.y) != (function.input[0], function.output[0])
        or any(n.op_type != "Constant" for n in rest)
        or len(rest) != DECOMPOSITIONS[match.kind].needs_one
    ):
        return None
    return match.kind


def check_graph(model: onnx.ModelProto, base_dir: str = "") -> GraphCheck:
    """Count the Serf decompositions and the original activations left in ``model``.

    ``base_dir``: the folder of the model file, when its weights are in a side file.
    """
    graph = model.graph
    nodes = list(graph.node)  # kept alive, so that id() of each node stays stable below
    result = GraphCheck()
    local = {(f.domain, f.name): f for f in model.functions}
    domains = {o.domain for o in model.opset_import} | {n.domain for n in nodes}
    domains |= {n.domain for f in model.functions for n in f.node}  # what function bodies use
    result.custom_domains = sorted(domains - _STANDARD_DOMAINS - {d for d, _ in local})
    matches = find_serf(nodes, scalar_constants(graph.initializer, nodes, base_dir))
    used = {id(node) for match in matches for node in match.nodes}
    result.serf.update(match.kind for match in matches)

    kinds = {key: serf_function_kind(f) for key, f in local.items() if f.name.startswith("Serf")}
    result.bad_functions = sorted(f"{d}.{n}" for (d, n), kind in kinds.items() if kind is None)
    for node in nodes:
        kind = kinds.get((node.domain, node.op_type))
        if kind is not None:
            result.serf[kind] += 1
        elif node.op_type in _ACTIVATION_OPS:
            result.leftovers[node.op_type] += 1
        elif node.op_type == "Sigmoid":
            consumers = [n for n in nodes if node.output[0] in n.input and n.op_type == "Mul"]
            if any(node.input[0] in c.input for c in consumers):
                result.leftovers["SiLU (Sigmoid*Mul)"] += 1
        elif node.op_type in ("Erf", "Softplus") and id(node) not in used:
            result.leftovers[f"{node.op_type} outside a Serf pattern"] += 1
    return result


__all__ = [
    "GraphCheck",
    "SerfMatch",
    "check_graph",
    "find_serf",
    "scalar_constants",
    "serf_function_kind",
]
