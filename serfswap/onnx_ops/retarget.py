"""Rewrite the Serf patterns of an ONNX file into another decomposition: for files exported
elsewhere (Optimum, ``torch.onnx.export``) or by serfswap for another target.

Why: the fastest exact decomposition depends on where the file runs (``exp-log`` on
onnxruntime's CPU, ``softplus`` on CUDA: :data:`serfswap.onnx_ops.decompositions.TARGETS`), and
files written by other exporters carry torch's own form. Found, with the graph checks of
:mod:`serfswap.onnx_ops.graph`:

* each decomposition of :data:`~serfswap.onnx_ops.decompositions.DECOMPOSITIONS` (the
  TorchScript exporter, and so Optimum, writes ``softplus``: Softplus, Erf, Mul);
* the dynamo exporter's form of ``F.softplus``: ``Where(Greater(x, t), x, Softplus(x))``, torch's
  threshold ``t`` (20) kept; above 15, softplus(x) and x agree to float32 rounding, so the
  ``Where`` is dropped first and the rest is the ``softplus`` pattern;
* a model-local ``serfswap.Serf`` function (``--functions``): its body is replaced.

Each pattern whose intermediate values nothing else reads is replaced by the chosen
decomposition's steps, in place, the constant 1 of ``exp-log`` typed as x (read from onnx's
shape inference on a copy). Nothing else in the graph changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError, ExportFailedError, InvalidChoiceError
from .decompositions import DECOMPOSITIONS, ONE, X, choose
from .functions import DOMAIN, NAME, _body, _replace, _self_contained
from .graph import find_serf, scalar_constants, serf_function_kind

# Above this threshold torch's softplus returns x; softplus(x) - x = log1p(exp(-x)) is below
# float32's half-ulp of x there (3e-7 at x = 15 against 4.8e-7), so dropping the Where is exact.
_SAFE_THRESHOLD = 15.0


@dataclass
class Retargeted:
    """What :func:`retarget` changed: the patterns found per kind (``softplus-threshold`` is
    the dynamo exporter's form), how many were rewritten into ``decomposition`` (patterns
    already in it count too), and the patterns left because a value inside them is read
    elsewhere."""

    decomposition: str
    found: Counter[str] = field(default_factory=Counter)
    rewritten: int = 0
    left: int = 0
    function: str | None = None  # the kind of a serfswap.Serf function's body, rewritten
    path: Path | None = None  # the file written (retarget_file)
    max_abs_diff: dict[str, float] | None = None  # against the source file, when verified

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.found.items())) or "none"
        text = f"Serf patterns found: {kinds}; {self.rewritten} now {self.decomposition}"
        if self.function:
            text += f"; the serfswap.Serf function's body ({self.function}) rewritten"
        if self.left:
            text += f"; {self.left} left as they were (a value inside is read elsewhere)"
        if self.path is not None:
            text = f"wrote {self.path}\n  {text}\n  "
            if self.max_abs_diff is None:
                text += "not verified (--no-verify)"
            else:
                worst = max(self.max_abs_diff.values(), default=0.0)
                text += (
                    f"verified with onnxruntime against the input file: max abs diff {worst:.2e}"
                )
        return text


def _is_threshold(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    readers: Counter[str],
    constants: dict[str, float],
) -> bool:
    """Whether ``node`` is ``Where(Greater(x, t), x, Softplus(x))`` with t >= 15 and the
    Greater read by that Where only: torch's ``F.softplus`` as the dynamo exporter writes it."""
    if node.op_type != "Where" or len(node.input) != 3:
        return False
    cond, soft = producer.get(node.input[0]), producer.get(node.input[2])
    return (
        cond is not None
        and soft is not None
        and cond.op_type == "Greater"
        and soft.op_type == "Softplus"
        and cond.input[0] == node.input[1] == soft.input[0]
        and constants.get(cond.input[1], 0.0) >= _SAFE_THRESHOLD
        and readers[cond.output[0]] == 1
    )


def _drop_thresholds(
    nodes: list[onnx.NodeProto], constants: dict[str, float], outputs: set[str]
) -> tuple[list[onnx.NodeProto], set[str], set[str]]:
    """``nodes`` without each threshold ``Where`` (:func:`_is_threshold`) and its Greater, their
    readers reading the Softplus instead; the outputs of those Softplus nodes; the thresholds'
    names. A Where whose result is a graph output stays (its name is the file's interface)."""
    producer = {out: n for n in nodes for out in n.output}
    readers = Counter(name for n in nodes for name in n.input)
    alias: dict[str, str] = {}
    gone: set[int] = set()
    thresholds: set[str] = set()
    for node in nodes:
        if node.output[0] not in outputs and _is_threshold(node, producer, readers, constants):
            alias[node.output[0]] = producer[node.input[2]].output[0]
            gone |= {id(node), id(producer[node.input[0]])}
            thresholds.add(producer[node.input[0]].input[1])
    kept = [n for n in nodes if id(n) not in gone]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    return kept, set(alias.values()), thresholds


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every value onnx's shape inference can type, on a copy (the model
    keeps no value_info of it)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _one(graph: onnx.GraphProto, dtype: int) -> str:
    """The name of an initializer holding 1 in ``dtype``, added when there is none of ours."""
    name = f"serfswap_one_{onnx.TensorProto.DataType.Name(dtype).lower()}"
    if all(init.name != name for init in graph.initializer):
        array = np.ones((), dtype=helper.tensor_dtype_to_np_dtype(dtype))
        graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _steps(decomposition: str, x: str, y: str, one: str | None, tag: str) -> list[Any]:
    """The nodes of ``decomposition`` from ``x`` to ``y``; intermediate values ``tag/tN``."""
    record = DECOMPOSITIONS[decomposition]
    names = [f"{tag}/t{i}" for i in range(len(record.steps) - 1)] + [y]
    leaves = {X: x, ONE: one}
    nodes = []
    for i, (step, out) in enumerate(zip(record.steps, names, strict=True)):
        inputs = [names[r] if isinstance(r, int) else leaves[r] for r in step.inputs]
        nodes.append(helper.make_node(step.op, inputs, [out], f"{tag}/{step.op}_{i}"))
    return nodes


def _retarget_function(model: onnx.ModelProto, decomposition: str, result: Retargeted) -> None:
    """Replace the body of a model-local ``serfswap.Serf`` function by ``decomposition``."""
    for index, function in enumerate(model.functions):
        if (function.domain, function.name) != (DOMAIN, NAME):
            continue
        kind = serf_function_kind(function)
        if kind is None:
            raise ExportFailedError(f"{DOMAIN}.{NAME}'s body is not a Serf decomposition")
        calls = sum(n.domain == DOMAIN and n.op_type == NAME for n in model.graph.node)
        result.found[kind] += calls
        result.rewritten += calls
        result.function = kind
        one = next((n.attribute[0].t for n in function.node if n.op_type == "Constant"), None)
        if DECOMPOSITIONS[decomposition].needs_one and one is None:
            one = numpy_helper.from_array(np.ones((), np.float32), "one")
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        record = DECOMPOSITIONS[decomposition]
        model.functions[index].CopyFrom(_body(record, one if record.needs_one else None, opset))


def retarget(model: onnx.ModelProto, decomposition: str, base_dir: str = "") -> Retargeted:
    """Rewrite every Serf pattern in ``model``'s main graph (and a ``serfswap.Serf`` function's
    body) into ``decomposition``, in place. ``base_dir``: the model file's folder, when its
    weights are in a side file (only one-element constants are read)."""
    if decomposition not in DECOMPOSITIONS:
        choices = sorted(DECOMPOSITIONS)
        raise InvalidChoiceError(f"decomposition={decomposition!r}: use one of {choices}")
    result = Retargeted(decomposition)
    _retarget_function(model, decomposition, result)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    constants = scalar_constants(graph.initializer, list(graph.node), base_dir)
    nodes, softplus_of_where, thresholds = _drop_thresholds(list(graph.node), constants, outputs)
    readers: dict[str, set[int]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(id(node))
    found = find_serf(nodes, constants)
    matches = [m for m in found if _self_contained(m, readers, outputs)]
    result.found.update(
        "softplus-threshold" if m.nodes[0].output[0] in softplus_of_where else m.kind for m in found
    )
    result.left = len(found) - len(matches)
    needs_one = DECOMPOSITIONS[decomposition].needs_one
    types = _elem_types(model) if needs_one and matches else {}
    replace_at = {id(m.nodes[-1]): m for m in matches}
    folded = {id(n) for m in matches for n in m.nodes}
    new_nodes = []
    for node in nodes:
        match = replace_at.get(id(node))
        if match is not None:
            one = _one(graph, types.get(match.x, onnx.TensorProto.FLOAT)) if needs_one else None
            new_nodes.extend(_steps(decomposition, match.x, match.y, one, f"serf/{match.y}"))
        elif id(node) not in folded:
            new_nodes.append(node)
    _replace(graph.node, new_nodes)
    _drop_unused(graph, {m.one for m in matches if m.one} | thresholds, outputs)
    result.rewritten += len(matches)
    return result


def _drop_unused(graph: onnx.GraphProto, names: set[str], outputs: set[str]) -> None:
    """The constants among ``names`` (the 1 of a replaced exp-log, the threshold of a dropped
    Where) that nothing reads any more: their initializers and Constant nodes."""
    unused = names - {name for node in graph.node for name in node.input} - outputs
    kept = [n for n in graph.node if n.op_type != "Constant" or n.output[0] not in unused]
    _replace(graph.node, kept)
    _replace(graph.initializer, [t for t in graph.initializer if t.name not in unused])


_TWO_GB = 2 * 1024**3


def retarget_file(
    source: str | Path,
    destination: str | Path,
    *,
    decomposition: str | None = None,
    target: str | None = None,
    verify: bool = True,
) -> Retargeted:
    """Rewrite the Serf patterns of the ONNX file ``source`` into ``decomposition`` (or
    ``target``'s: ``"cpu"`` or ``"cuda"``) and write the result at ``destination``, checked
    (onnx.checker) and, with ``verify``, run against ``source`` with onnxruntime on the same
    random inputs (:func:`serfswap.onnx_ops.compare.compare_files`) before it is moved into
    place; nothing is written on failure. Weights above 2 GB go to ``<destination>.data``.

    >>> retarget_file("optimum/model.onnx", "model-cpu.onnx", target="cpu")  # doctest: +SKIP
    """
    from ..io.paths import check_input_path, check_output_path, staged_output
    from .compare import compare_files
    from .value_info import strip_value_info

    try:
        decomposition = choose(decomposition, target)
    except ValueError as exc:
        raise InvalidChoiceError(str(exc)) from None
    source = check_input_path(source)
    destination = check_output_path(Path(destination))
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # protobuf's DecodeError, a missing side file
        raise ExportError(f"cannot read {source} as ONNX: {exc}") from None
    result = retarget(model, decomposition, str(source.parent))
    strip_value_info(model)  # any left would describe values that are gone
    with staged_output(destination, side_file=f"{destination.name}.data") as staged:
        large = model.ByteSize() > _TWO_GB
        onnx.save(model, str(staged), save_as_external_data=large,
                  location=f"{staged.name}.data")  # fmt: skip
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as exc:  # ValidationError, InferenceError
            raise ExportFailedError(f"the rewritten file fails onnx.checker: {exc}") from None
        if verify:
            result.max_abs_diff = compare_files(source, staged)
        result.path = destination
    return result


__all__ = ["Retargeted", "retarget", "retarget_file"]
