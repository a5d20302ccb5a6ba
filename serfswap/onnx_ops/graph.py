"""Graph checks on an exported ONNX model: how many Serf decompositions it holds, each verified
against its exact pattern, and which original activations are still in it."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from .decompositions import PATTERNS

# Op types that are themselves one of the activations serfswap replaces.
_ACTIVATION_OPS = {
    "Relu", "Gelu", "FastGelu", "BiasGelu", "Mish", "Elu", "Selu", "Celu", "LeakyRelu",
    "HardSwish", "PRelu", "ThresholdedRelu",
}  # fmt: skip
_STANDARD_DOMAINS = {"", "ai.onnx"}


@dataclass
class GraphCheck:
    """``serf``: decompositions found per kind; ``leftovers``: original activations by kind;
    ``custom_domains``: domains outside the ONNX standard (there should be none)."""

    serf: Counter[str] = field(default_factory=Counter)
    leftovers: Counter[str] = field(default_factory=Counter)
    custom_domains: list[str] = field(default_factory=list)

    @property
    def serf_total(self) -> int:
        return sum(self.serf.values())


def _is_one(name: str, constants: dict[str, float]) -> bool:
    return constants.get(name) == 1.0


def _constants(graph: onnx.GraphProto, base_dir: str) -> dict[str, float]:
    """Scalar constants of the graph (initializers and Constant nodes), by output name.

    Only one-element tensors are read, from the side file when the weights are external.
    """
    values: dict[str, float] = {}
    tensors = [(init.name, init) for init in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors.append((node.output[0], attr.t))
    for name, tensor in tensors:
        if math.prod(tensor.dims) == 1:
            values[name] = float(numpy_helper.to_array(tensor, base_dir).reshape(-1)[0])
    return values


def check_graph(model: onnx.ModelProto, base_dir: str = "") -> GraphCheck:
    """Count the Serf decompositions and the original activations left in ``model``.

    ``base_dir``: the folder of the model file, when its weights are in a side file.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = _constants(graph, base_dir)
    result = GraphCheck()
    result.custom_domains = sorted(
        {o.domain for o in model.opset_import} - _STANDARD_DOMAINS
        | {n.domain for n in graph.node} - _STANDARD_DOMAINS
    )
    used: set[int] = set()  # ids of nodes that belong to a matched Serf

    def parent(name: str, op_type: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    for mul in (n for n in graph.node if n.op_type == "Mul"):
        for x, other in (mul.input, reversed(mul.input)):
            erf = parent(other, "Erf")
            if erf is None:
                continue
            softplus = parent(erf.input[0], "Softplus")
            if softplus is not None and softplus.input[0] == x:
                result.serf["softplus"] += 1
                used.update(map(id, (mul, erf, softplus)))
                break
            log = parent(erf.input[0], "Log")
            add = parent(log.input[0], "Add") if log is not None else None
            if add is None:
                continue
            exp_out = next((i for i in add.input if not _is_one(i, constants)), None)
            exp = parent(exp_out, "Exp") if exp_out is not None else None
            if (
                exp is not None
                and exp.input[0] == x
                and any(_is_one(i, constants) for i in add.input)
            ):
                result.serf["exp-log"] += 1
                used.update(map(id, (mul, erf, log, add, exp)))
                break

    for node in graph.node:
        if node.op_type in _ACTIVATION_OPS:
            result.leftovers[node.op_type] += 1
        elif node.op_type == "Sigmoid":
            consumers = [n for n in graph.node if node.output[0] in n.input and n.op_type == "Mul"]
            if any(node.input[0] in c.input for c in consumers):
                result.leftovers["SiLU (Sigmoid*Mul)"] += 1
        elif node.op_type in ("Erf", "Softplus") and id(node) not in used:
            result.leftovers[f"{node.op_type} outside a Serf pattern"] += 1
    return result


__all__ = ["PATTERNS", "GraphCheck", "check_graph"]
