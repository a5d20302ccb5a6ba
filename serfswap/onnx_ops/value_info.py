"""Drop the intermediate shape annotations (``graph.value_info``) of an exported ONNX file.

Why: the dynamo exporter writes one ``value_info`` entry per intermediate value (331 in
all-MiniLM-L6-v2). No consumer needs them: a runtime infers the shapes it uses, and the graph's
inputs and outputs, which are the file's interface, keep theirs. But onnxruntime's optimizer
reads them: with them it fuses LayerNorm + Add into SkipLayerNormalization, which on a 2-thread
CPU ran slower than the two ops (15.7 ms against 6-8 ms per MiniLM batch of 8 x 128), so
serfswap's export of an unchanged model ran 1.09-1.10x Optimum's; without them, 1.00x (issue
#30). Function bodies (``--functions``) carry no value_info of their own and are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def strip_value_info(model: onnx.ModelProto) -> int:
    """Remove every intermediate shape annotation from ``model``'s main graph, in place; the
    graph inputs' and outputs' shapes stay (they are its interface). Returns how many went."""
    count = len(model.graph.value_info)
    del model.graph.value_info[:]
    return count


def strip_value_info_file(path: str | Path) -> int:
    """:func:`strip_value_info` on the file at ``path``, rewritten in place; a side file of
    weights is referenced, never read. Returns how many annotations went."""
    model = onnx.load(str(path), load_external_data=False)
    count = strip_value_info(model)
    if count:
        onnx.save(model, str(path))
    return count


__all__ = ["strip_value_info", "strip_value_info_file"]
