"""The names of models' inputs and outputs that every exporter and the runtime share, and lists
of them written short.

HuggingFace's input names (``input_ids``, ``attention_mask`` ...: which of them carry a sequence
axis) and Optimum's names of a decoder's KV cache in ONNX files (``past_key_values.{i}.key``
in, ``present.{i}.key`` out) live here once: the example inputs, the export (its axes, its
decoder task) and the runtime's generation loop read them from here.

:func:`summarise` writes a list of names short: the names of a decoder's KV cache
(``past_key_values.0.key`` ... ``past_key_values.29.value``, 60 of them) become one entry,
``past_key_values.{0..29}.key/value``, so that a report fits on a screen.

Pure string work, no torch: the runtime (numpy and onnxruntime only) imports it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# HuggingFace's input names, as forward takes them and as the ONNX files serfswap writes carry them.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
POSITION_IDS = "position_ids"
DECODER_PREFIX = "decoder_"  # an encoder-decoder's decoder inputs: decoder_input_ids ...
DECODER_INPUT_IDS = DECODER_PREFIX + INPUT_IDS
DECODER_ATTENTION_MASK = DECODER_PREFIX + ATTENTION_MASK
# Inputs whose dim 1 is the sequence: dynamic with the batch, whether the inputs were inferred
# or given (a tokenizer's output is the usual case).
SEQUENCE_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, POSITION_IDS,
                   DECODER_INPUT_IDS, DECODER_ATTENTION_MASK)  # fmt: skip
LOGITS = "logits"  # a language model's (and a timm classifier's) output
# The dynamic axes of the files serfswap writes: dim 0 of every input, dim 1 of a sequence input
# (decoder_sequence for the decoder's inputs), dim 2 of a cache input.
BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"

# A decoder's KV cache in Optimum's layout: each layer's key and value as inputs
# ``past_key_values.{i}.key`` / ``.value`` and as outputs ``present.{i}.key`` / ``.value``.
PAST = "past_key_values"
PRESENT = "present"
KEY_VALUE = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    """The cache input of ``layer``; ``kind``: ``"key"`` or ``"value"``."""
    return f"{PAST}.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The cache output of ``layer``; ``kind``: ``"key"`` or ``"value"``."""
    return f"{PRESENT}.{layer}.{kind}"


def past_names(layers: int) -> list[str]:
    """The cache inputs of a ``layers``-layer decoder, in the order its graph takes them.

    >>> past_names(1)
    ['past_key_values.0.key', 'past_key_values.0.value']
    """
    return [past_name(i, kind) for i in range(layers) for kind in KEY_VALUE]


# An encoder-decoder's cache (Optimum's seq2seq layout): each layer's self-attention ("decoder")
# and cross-attention ("encoder") key and value, ``past_key_values.{i}.decoder.key`` ...
SEQ2SEQ_PARTS = ("decoder", "encoder")


def seq2seq_past_names(layers: int) -> list[str]:
    """The cache inputs of a ``layers``-layer encoder-decoder's decoder, in graph order.

    >>> seq2seq_past_names(1)[:2]
    ['past_key_values.0.decoder.key', 'past_key_values.0.decoder.value']
    """
    return [past_name(i, f"{part}.{kind}") for i in range(layers) for part in SEQ2SEQ_PARTS
            for kind in KEY_VALUE]  # fmt: skip


def is_past(name: str) -> bool:
    """Whether ``name`` is a cache input (``past_key_values.*``)."""
    return name.startswith(PAST + ".")


def present_for(past: str) -> str:
    """The output whose value the cache input ``past`` takes at the next step.

    >>> present_for("past_key_values.3.value")
    'present.3.value'
    """
    return PRESENT + past.removeprefix(PAST)


def past_for(present: str) -> str:
    """The cache input that the output ``present`` feeds at the next step.

    >>> past_for("present.3.decoder.value")
    'past_key_values.3.decoder.value'
    """
    return PAST + present.removeprefix(PRESENT)


_INDEX = re.compile(r"(?:(?<=\.)|^)(\d+)(?=\.|$)")  # a dotted part that is a number


def _indices(values: list[int]) -> str:
    """``{0..29}`` for a run of consecutive numbers, ``{0,2,5}`` otherwise."""
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def summarise(entries: Iterable[tuple[str, str]], sep: str = " ") -> list[str]:
    """``name detail`` strings (``sep`` between them), names that differ only by one number
    (with the same detail) folded into one ``{first..last}``, then names that differ only by
    their last dotted part (``.key`` / ``.value``) joined with ``/``. Order: where each group
    first appears.

    >>> summarise([("ids", "[2, 8]"), ("kv.0.key", "[2, 4]"), ("kv.0.value", "[2, 4]"),
    ...            ("kv.1.key", "[2, 4]"), ("kv.1.value", "[2, 4]")])
    ['ids [2, 8]', 'kv.{0..1}.key/value [2, 4]']
    """
    groups: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str] | tuple[str, str, None]] = []
    for name, detail in entries:
        match = _INDEX.search(name)
        if match is None:
            order.append((name, detail, None))
            continue
        template = name[: match.start()] + "{}" + name[match.end() :]
        key = (template, detail)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(match.group(1)))
    # key/value: templates equal but for their last dotted part, with the same numbers
    merged: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    lines: list[tuple[str, str, tuple[int, ...]] | str] = []
    for item in order:
        if len(item) == 3:
            lines.append(_line(item[0], item[1], sep))
            continue
        template, detail = item
        numbers = groups[item]
        if len(numbers) == 1:
            lines.append(_line(template.replace("{}", str(numbers[0]), 1), detail, sep))
            continue
        head, dot, last = template.rpartition(".")
        stem = (head if dot and "{}" in head else template, detail, tuple(numbers))
        if stem not in merged:
            merged[stem] = []
            lines.append(stem)
        merged[stem].append(last if dot and "{}" in head else "")
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
            continue
        stem, detail, numbers = line
        lasts = merged[line]
        name = stem.replace("{}", _indices(list(numbers)), 1)
        if lasts != [""]:
            name += "." + "/".join(lasts)
        out.append(_line(name, detail, sep))
    return out


def _line(name: str, detail: str, sep: str) -> str:
    return f"{name}{sep}{detail}" if detail else name
