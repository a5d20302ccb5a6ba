"""The names an exported file carries: its inputs (the example inputs as keywords, inferred when
none are given), its outputs (as the model names them) and its dynamic axes (``batch``,
``sequence``, ``past_sequence`` instead of the exporter's ``s72``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExampleInputsError, ExportError
from ..inputs import as_kwargs, example_inputs_for
from ..names import (
    ATTENTION_MASK,
    BATCH,
    DECODER_PREFIX,
    LOGITS,
    PAST_SEQUENCE,
    SEQUENCE,
    SEQUENCE_INPUTS,
    is_past,
)


def named_inputs(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """The example inputs as keywords, inferred when None; an export's error when they cannot
    be (the message says to pass example_inputs)."""
    try:
        if example_inputs is None:
            return example_inputs_for(model)
        return as_kwargs(model, example_inputs)
    except ExampleInputsError as error:
        raise ExportError(error.template, option=error.option, **error.values) from None


def sequence_inputs(inputs: dict[str, torch.Tensor]) -> set[str]:
    """Inputs whose dim 1 is the sequence, by HuggingFace's names (:data:`SEQUENCE_INPUTS`)."""
    return {k for k in inputs if k in SEQUENCE_INPUTS}


def output_names(model: nn.Module, output: Any) -> list[str]:
    """ONNX output names as the model names its outputs: a ModelOutput's fields
    (``last_hidden_state``, ``pooler_output``, ``logits``), ``logits`` for a timm classifier's
    tensor, ``output`` for a plain module's; nested items get ``.index`` suffixes.

    The order is the exporter's: mappings (ModelOutput is one) in key order without None,
    sequences in order. Walked here because transformers 4.x registers ModelOutput with torch's
    pytree without the keys that ``tree_flatten_with_path`` needs."""
    single = LOGITS if isinstance(getattr(model, "pretrained_cfg", None), dict) else "output"

    def walk(value: Any, name: str) -> list[str]:
        if isinstance(value, torch.Tensor):
            return [name or single]
        if isinstance(value, Mapping):
            items = [(str(k), v) for k, v in value.items() if v is not None]
        elif isinstance(value, list | tuple):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            return []
        return [n for key, v in items for n in walk(v, f"{name}.{key}" if name else key)]

    return walk(output, "")


def leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, flattened in the exporter's order (the order of
    :func:`output_names`)."""
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def name_axes(path: Path, seq_names: set[str]) -> dict[str, list[str]]:
    """Rename the exporter's symbolic dimensions (``s72``) to ``batch`` and ``sequence`` in the
    file at ``path``, wherever they appear (inputs, outputs, intermediate shapes); returns the
    dynamic axes of each input by name.

    The exporter gives each input's batch a symbol of its own when the graph never equates
    them (BERT's ``input_ids`` and ``attention_mask``); they are one batch to the user, who
    feeds them together, so they get one name. A symbol that is not dim 0 of an input (batch)
    or dim 1 of a text input (sequence) keeps the exporter's name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    renames: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        # a KV cache in Optimum's layout; a seq2seq cross-attention cache's is the encoder's length
        past = is_past(value.name) and ".encoder." not in value.name
        named = {0: True, 1: value.name in seq_names, 2: past}
        for index, role in ((0, BATCH), (1, SEQUENCE), (2, PAST_SEQUENCE)):
            if index < len(dims) and dims[index].dim_param and named[index]:
                decoder = value.name.startswith(DECODER_PREFIX) and index == 1
                prefix = DECODER_PREFIX if decoder else ""  # decoder_sequence
                renames.setdefault(dims[index].dim_param, prefix + role)
    if any(name.startswith(PAST_SEQUENCE) for name in renames.values()):
        mask = next((v for v in model.graph.input if v.name == ATTENTION_MASK), None)
        if mask is not None and mask.type.tensor_type.shape.dim[1].dim_param:
            renames[mask.type.tensor_type.shape.dim[1].dim_param] = f"{PAST_SEQUENCE} + {SEQUENCE}"
    if renames:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)
        onnx.save(model, str(path))
    return {
        value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        for value in model.graph.input
        if any(d.dim_param for d in value.type.tensor_type.shape.dim)
    }
