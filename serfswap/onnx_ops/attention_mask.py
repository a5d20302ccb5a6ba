"""Rewrite the attention-mask subgraph of a dynamo-exported encoder into the form onnxruntime's
transformer optimizer fuses into its ``Attention`` op.

Why: for a transformers 5 encoder (BERT, MiniLM) the dynamo exporter writes the padding mask as
``Where(And(..., GatherND(Cast(attention_mask), indices)), 0, -3.4e38)`` added to the scaled
scores; onnxruntime 1.32's ``FusionAttention`` knows the TorchScript exporter's forms (the
classic ``(1 - mask[:, None, None, :]) * min`` and transformers 5's ``Flatten, Gather, Reshape,
And, Expand, Where``), not this one, so it fused 0 of all-MiniLM-L6-v2's 6 attention layers
(``fuse_attention: failed to match mask path``; every other part of the layer matched).

The rewrite writes a form the optimizer knows beside it, ``Where(Cast(Sub(1, Expand(Unsqueeze(
Unsqueeze(attention_mask))))), min, 0)``, shaped (batch, 1, 1, keys), and points the score
additions at it; an integer mask of 0 (padding) and 1 (a token), as tokenizers give it.
It is the same function only for a *padding-only* mask (bidirectional, no causal or sliding
window part), so a mask is rewritten only when

* it is ``Where(condition, 0, c)`` with c a negative constant, added to scores that go into a
  Softmax;
* its condition reads the graph input ``attention_mask`` and no other input except through
  ``Shape``; and
* every comparison in the condition has a constant side (a causal mask compares key positions
  with query positions: GPT-2's and LLaMA's are left as they are).

Callers check the rewritten file against the original on padded masks
(:func:`padded_feed`), left and right padding both, so a mask that passes these checks and
still means something else fails there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..names import ATTENTION_MASK
from .graph import scalar_constants

_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_COMPARISONS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"}


def _constants(model: onnx.ModelProto) -> set[str]:
    """Names of the values that are constants: initializers and Constant nodes' outputs."""
    names = {t.name for t in model.graph.initializer}
    return names | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}


def _padding_only(
    condition: str, producer: dict[str, onnx.NodeProto], constants: set[str], inputs: set[str]
) -> bool:
    """Whether the boolean ``condition`` is computed from ``attention_mask`` alone (other inputs
    only through their shapes) with no comparison between two computed values."""
    seen, stack, reached = set(), [condition], set()
    while stack:
        name = stack.pop()
        if name in seen or name in constants or not name:
            continue
        seen.add(name)
        if name in inputs:
            reached.add(name)
            continue
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "Shape":  # a shape, not the values: any input may give it
            continue
        if node.op_type in _COMPARISONS and not any(i in constants for i in node.input):
            return False  # positions against positions: causal or sliding window
        stack.extend(node.input)
    return reached == {ATTENTION_MASK}


def _where_masks(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The Where nodes whose output is added to the input of a Softmax, by output name."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        for name in add.input:
            where = producer.get(name)
            if where is not None and where.op_type == "Where":
                found[name] = where
    return found


def _new_mask(
    model: onnx.ModelProto, fill: np.ndarray, mask_type: int
) -> tuple[list[onnx.NodeProto], str]:
    """The mask ``Where(bool(1 - expand(mask[:, None, None, :])), fill, 0)``: its nodes (their
    constants added as initializers) and its output name. The form of the optimizer's SDPA
    patterns: its classic ``Mul(Sub(1, mask), fill)`` is not found where the scores are scaled
    by a Mul (the dynamo export's), as the optimizer takes the first Mul above the Add."""
    prefix = "serfswap_mask"
    ints = helper.tensor_dtype_to_np_dtype(mask_type)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis1"),
        numpy_helper.from_array(np.array([2], np.int64), f"{prefix}_axis2"),
        numpy_helper.from_array(np.ones(4, np.int64), f"{prefix}_ones4"),
        numpy_helper.from_array(np.array(1, ints), f"{prefix}_one"),
        numpy_helper.from_array(np.array(fill.item(), fill.dtype), f"{prefix}_fill"),
        numpy_helper.from_array(np.array(0, fill.dtype), f"{prefix}_zero"),
    ])  # fmt: skip
    nodes = [
        helper.make_node("Unsqueeze", [ATTENTION_MASK, f"{prefix}_axis1"], [f"{prefix}_3d"]),
        helper.make_node("Unsqueeze", [f"{prefix}_3d", f"{prefix}_axis2"], [f"{prefix}_4d"]),
        helper.make_node("Expand", [f"{prefix}_4d", f"{prefix}_ones4"], [f"{prefix}_expanded"]),
        helper.make_node("Sub", [f"{prefix}_one", f"{prefix}_expanded"], [f"{prefix}_inverted"]),
        helper.make_node(
            "Cast", [f"{prefix}_inverted"], [f"{prefix}_padding"], to=onnx.TensorProto.BOOL
        ),
        helper.make_node(
            "Where", [f"{prefix}_padding", f"{prefix}_fill", f"{prefix}_zero"], [prefix]
        ),
    ]
    for number, node in enumerate(nodes):
        node.name = f"{prefix}_{number}"
    return nodes, prefix


def _constant_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """A scalar constant's value with its dtype (initializer or Constant node)."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor) if np.prod(tensor.dims) == 1 else None
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value) if value is not None else None
    return None


def _prune(model: onnx.ModelProto) -> int:
    """Remove the nodes whose outputs nothing reads (the old mask subgraph); how many went."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    removed = 0
    while True:
        read = Counter(i for n in graph.node for i in n.input)
        dead = [n for n in graph.node if not any(o in outputs or read[o] for o in n.output)]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def classic_attention_mask(model: onnx.ModelProto) -> int:
    """Rewrite ``model``'s padding-only attention masks (the module docstring says which) into
    the classic form, in place. Returns how many score additions now read it (0: nothing
    changed)."""
    graph = model.graph
    mask_type = next((i.type.tensor_type.elem_type for i in graph.input
                      if i.name == ATTENTION_MASK), None)  # fmt: skip
    if mask_type not in _INTEGER_TYPES:
        return 0
    producer = {o: n for n in graph.node for o in n.output}
    constants = _constants(model)
    values = scalar_constants(graph.initializer, list(graph.node), "")
    inputs = {i.name for i in graph.input}
    masks = {}
    for name, where in _where_masks(model).items():
        fill = _constant_array(model, where.input[2])
        if values.get(where.input[1]) != 0.0 or fill is None or not fill.item() < 0:
            continue
        if _padding_only(where.input[0], producer, constants, inputs):
            masks[name] = fill
    if not masks:
        return 0
    nodes, mask = _new_mask(model, next(iter(masks.values())).reshape(()), mask_type)
    rewired = 0
    for node in graph.node:
        if node.op_type == "Add" and any(i in masks for i in node.input):
            for index, name in enumerate(node.input):
                if name in masks:
                    node.input[index] = mask
                    rewired += 1
    for node in reversed(nodes):  # they read a graph input and constants only: first
        graph.node.insert(0, node)
    _prune(model)
    return rewired


def padded_feed(feed: dict[str, Any]) -> dict[str, Any]:
    """``feed`` with padding in its ``attention_mask``: the first row padded at the end, the
    last at the start (batch 2 and more), so that a wrong mask form changes the outputs."""
    feed = dict(feed)
    mask = feed.get(ATTENTION_MASK)
    if mask is None or mask.ndim != 2 or mask.shape[1] < 3:
        return feed
    mask = np.ones_like(mask)
    keep = max(1, mask.shape[1] // 2)
    mask[0, keep:] = 0
    if mask.shape[0] > 1:
        mask[-1, : mask.shape[1] - keep] = 0
    feed[ATTENTION_MASK] = mask
    return feed


__all__ = ["classic_attention_mask", "padded_feed"]
