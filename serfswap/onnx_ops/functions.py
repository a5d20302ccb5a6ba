"""Fold each Serf decomposition of an exported graph into one call of a model-local ONNX
function ``serfswap.Serf`` whose body is that decomposition.

Why: a graph with one ``Serf`` node per activation reads like the model (Netron shows one box,
not five), and another runtime can map the single node onto a fused kernel by pattern matching.
The body is standard ops only, so any runtime that reads ONNX functions (IR version 8 and up)
can inline it; onnxruntime does so when it loads the model, so it runs the same kernels as the
plain decomposition. The dynamo exporter always inlines functions, hence a pass after export.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper, numpy_helper

from ..errors import ExportFailedError
from .decompositions import DECOMPOSITIONS, ONE, Decomposition, X
from .graph import SerfMatch, find_serf, scalar_constants

DOMAIN = "serfswap"
NAME = "Serf"


def _scalar(graph: onnx.GraphProto, name: str, base_dir: str) -> onnx.TensorProto:
    """The one-element tensor behind ``name`` (an initializer or a Constant node's value)."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.from_array(numpy_helper.to_array(init, base_dir), "one")
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return next(a.t for a in node.attribute if a.name == "value")
    raise ExportFailedError(f"cannot fold into functions: no constant {name!r} in the graph")


def _body(record: Decomposition, one: onnx.TensorProto | None, opset: int) -> onnx.FunctionProto:
    """The function x -> y whose body is ``record``'s steps (values ``t0``, ``t1``...), with
    ``one``, the graph's constant 1, as a Constant node when a step reads it."""
    names = [f"t{i}" for i in range(len(record.steps) - 1)] + ["y"]
    leaves = {X: "x", ONE: "one"}
    nodes = [helper.make_node("Constant", [], ["one"], value=one)] if one is not None else []
    for step, out in zip(record.steps, names, strict=True):
        inputs = [names[i] if isinstance(i, int) else leaves[i] for i in step.inputs]
        nodes.append(helper.make_node(step.op, inputs, [out]))
    return helper.make_function(DOMAIN, NAME, ["x"], ["y"], nodes, [helper.make_opsetid("", opset)])


def _self_contained(match: SerfMatch, readers: dict[str, set[int]], outputs: set[str]) -> bool:
    """Whether no value inside ``match`` (other than its result) is read outside it.

    ``readers``: ids of the nodes that read each value; ``outputs``: the graph's outputs.
    """
    inside = {id(node) for node in match.nodes}
    inner = [out for node in match.nodes[:-1] for out in node.output]
    return all(out not in outputs and readers.get(out, set()) <= inside for out in inner)


def _replace(field: Any, items: list[Any]) -> None:
    """Replace the contents of a repeated protobuf field."""
    del field[:]
    field.extend(items)


def fold_into_functions(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Replace every Serf decomposition in ``model``'s main graph by a ``serfswap.Serf`` call,
    in place, and add the function. Returns how many were folded.

    ``base_dir``: the folder of the model file, when its weights are in a side file.
    Raises :class:`~serfswap.ExportFailedError` when the graph holds decompositions of more
    than one kind (an export holds one kind only) or already defines a ``serfswap.Serf``.
    """
    graph = model.graph
    # One list of the nodes, kept alive: protobuf hands out a new wrapper object per access, so
    # id() of a node is only stable while some reference to its wrapper lives.
    all_nodes = list(graph.node)
    readers: dict[str, set[int]] = {}
    for node in all_nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(id(node))
    outputs = {o.name for o in graph.output}
    found = find_serf(all_nodes, scalar_constants(graph.initializer, all_nodes, base_dir))
    matches = [m for m in found if _self_contained(m, readers, outputs)]
    if not matches:
        return 0
    if len({m.kind for m in matches}) > 1:
        kinds = sorted({m.kind for m in matches})
        raise ExportFailedError(f"cannot fold into functions: decompositions of kinds {kinds}")
    if any((f.domain, f.name) == (DOMAIN, NAME) for f in model.functions):
        raise ExportFailedError(f"cannot fold into functions: {DOMAIN}.{NAME} is defined already")
    ones = {m.one: _scalar(graph, m.one, base_dir) for m in matches if m.one is not None}
    if len({t.data_type for t in ones.values()}) > 1:
        raise ExportFailedError(
            "cannot fold into functions: exp-log decompositions of several dtypes"
        )
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    call_at = {id(m.nodes[-1]): m for m in matches}
    folded = {id(node) for m in matches for node in m.nodes}
    gone = {out for m in matches for node in m.nodes[:-1] for out in node.output}
    nodes = []
    for node in all_nodes:
        match = call_at.get(id(node))
        if match is not None:
            nodes.append(helper.make_node(NAME, [match.x], [match.y], node.name, domain=DOMAIN))
        elif id(node) not in folded:
            nodes.append(node)
    # The constants 1 (exp-log's) moved into the body; drop those nothing else uses.
    still_used = {name for node in nodes for name in node.input} | outputs
    unused = set(ones) - still_used
    _replace(graph.node, [n for n in nodes if n.op_type != "Constant" or n.output[0] not in unused])
    _replace(graph.initializer, [t for t in graph.initializer if t.name not in unused])
    _replace(graph.value_info, [v for v in graph.value_info if v.name not in gone])
    record = DECOMPOSITIONS[matches[0].kind]
    model.functions.append(_body(record, next(iter(ones.values()), None), opset))
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(matches)
