"""The seq2seq tasks: an encoder-decoder (T5, BART, Marian, Pegasus, mBART, Whisper) exported as
Optimum's three files, with the decoder's KV cache.

``text2text-generation-with-past`` (a text encoder) and ``automatic-speech-recognition-with-past``
(Whisper-style: log-mel features in) write a folder that ``ORTModelForSeq2SeqLM`` /
``ORTModelForSpeechSeq2Seq`` load as they load Optimum's own export:

* ``encoder_model.onnx``: ``input_ids``, ``attention_mask`` (or ``input_features``) ->
  ``last_hidden_state``;
* ``decoder_model.onnx``, the first step: ``input_ids``, ``encoder_attention_mask`` (text only),
  ``encoder_hidden_states`` -> ``logits`` and every layer's ``present.{i}.decoder.key`` /
  ``.value`` and ``present.{i}.encoder.key`` / ``.value`` (the cross-attention keys and values,
  computed once from the encoder's output);
* ``decoder_with_past_model.onnx``, every later step: the same inputs and
  ``past_key_values.{i}.decoder.key`` / ``.value`` / ``.encoder.key`` / ``.value`` (layer by
  layer, in that order: Optimum groups them four per layer) -> ``logits`` and the
  ``present.{i}.decoder.*`` only (the encoder's never change);
* ``config.json`` and ``generation_config.json``.

Two decoder files, not Optimum's merged one (an ``If`` on ``use_cache_branch``): the first step
computes the cross-attention cache from ``encoder_hidden_states`` and the later ones read it, two
graphs that torch.export traces apart. Each file goes through :func:`export_onnx` (the staged
write, the graph check of every Serf, verification against torch: the encoder on a padded batch,
the first step at two decoder lengths, the later steps at two past lengths).

The three graphs are torch modules of :mod:`serfswap.export.seq2seq_parts`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportError, TaskError
from ..names import is_past
from ..options import SEQ2SEQ_TASKS
from ..runtime.seq2seq import DECODER_FILE, ENCODER_FILE, WITH_PAST_FILE
from .seq2seq_parts import DecoderPart, EncoderPart, forward_parameters, is_speech, layout

TEXT2TEXT, SPEECH = SEQ2SEQ_TASKS


def _kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None):
        return f"{config.model_type} ({type(model).__name__})"
    return type(model).__name__


def check_seq2seq_task(model: nn.Module, task: str) -> None:
    """TaskError unless ``model`` is a transformers encoder-decoder with a language-model head
    and a KV cache, of the kind ``task`` names (text encoder or speech encoder)."""
    config = getattr(model, "config", None)
    seq2seq = (
        getattr(config, "is_encoder_decoder", False)
        and hasattr(model, "get_encoder")
        and getattr(model, "get_output_embeddings", lambda: None)() is not None
        and {"encoder_outputs", "decoder_input_ids"} <= forward_parameters(model)
    )
    if not seq2seq:
        raise TaskError(
            f"task {task!r} needs a transformers encoder-decoder with a language-model head "
            f"(T5, BART, Marian, Whisper...: AutoModelForSeq2SeqLM); got {_kind(model)}"
            + (
                ": a decoder-only model exports with --task text-generation-with-past"
                if config is not None and not getattr(config, "is_encoder_decoder", False)
                else ""
            )
        )
    speech = is_speech(model)
    if speech != (task == SPEECH):
        other = SPEECH if speech else TEXT2TEXT
        raise TaskError(
            f"task {task!r} does not fit {_kind(model)}, whose encoder takes "
            f"{'input_features' if speech else 'input_ids'}: use --task {other}"
        )


# The folder ------------------------------------------------------------------------------------


@dataclass
class Seq2SeqExportReport:
    """What :func:`export_seq2seq` wrote: the folder and each file's :class:`ExportReport`."""

    path: Path
    task: str
    parts: dict[str, Any] = field(default_factory=dict)  # file name -> ExportReport

    @property
    def leftovers(self) -> dict[str, int]:
        """Activations left unconverted, over the three files."""
        total: dict[str, int] = {}
        for report in self.parts.values():
            for name, count in report.leftovers.items():
                total[name] = total.get(name, 0) + count
        return total

    @property
    def serf_nodes(self) -> int:
        return sum(report.serf_nodes for report in self.parts.values())

    @property
    def verified(self) -> bool:
        return all(report.verified for report in self.parts.values())

    def __str__(self) -> str:
        lines = [f"wrote {self.path}/ ({self.task}: Optimum's seq2seq layout)"]
        for name, report in self.parts.items():
            text = str(report).replace(str(report.path), name)
            lines += ["  " + line for line in text.splitlines()]
        lines.append("  + config.json, generation_config.json")
        return "\n".join(lines)


def _check_options(task: str, example_inputs: Any, dynamic: Any, exporter: str) -> None:
    if example_inputs is not None or dynamic is False:
        raise ExportError(f"task {task!r} makes its own inputs, with dynamic shapes")
    if exporter == "torchscript":
        raise ExportError(f"task {task!r} is exported by the dynamo exporter only")


def export_seq2seq(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    task: str,
    convert_activations: bool = False,
    dynamic: bool | None = None,
    exporter: str = "auto",
    **options: Any,
) -> Seq2SeqExportReport:
    """Export ``model`` into the folder ``path`` (new or empty) in Optimum's seq2seq layout.

    The files are written into a staging folder beside ``path`` and moved into place only when
    all three exported and verified: a failure writes nothing. ``options``: those of
    :func:`export_onnx` (opset, dtype, decomposition, verify, atol, rtol, external_data,
    functions), applied to each file.
    """
    from ..io.paths import check_output_folder
    from ..modes import eval_mode
    from ..rewrite.convert import convert
    from .pipeline import export_onnx

    if not isinstance(model, nn.Module):
        raise ExportError(f"task {task!r} needs a transformers model, not {type(model).__name__}")
    check_seq2seq_task(model, task)
    _check_options(task, example_inputs, dynamic, exporter)
    folder = check_output_folder(path)
    if convert_activations:
        model = convert(model)
    report = Seq2SeqExportReport(folder, task)
    staging = folder.parent / f".serfswap-{secrets.token_hex(8)}"
    try:
        staging.mkdir()  # the umask's mode: the folder itself moves into place
        with eval_mode(model), eager_attention(model):
            shape = layout(model)
            parts = {
                ENCODER_FILE: EncoderPart(model, shape),
                DECODER_FILE: DecoderPart(model, shape, with_past=False),
                WITH_PAST_FILE: DecoderPart(model, shape, with_past=True),
            }
            for name, part in parts.items():
                written = export_onnx(part, staging / name, exporter=exporter, **options)
                written.dynamic_axes = name_encoder_axes(staging / name)
                report.parts[name] = written
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if folder.exists():  # an empty folder (check_output_folder): replaced by the new one
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for part_report in report.parts.values():  # the paths the files have now
        part_report.path = folder / part_report.path.name
        if part_report.external_data is not None:
            part_report.external_data = folder / part_report.external_data.name
    return report


# What a model folder holds beside the weights that generation needs: the tokenizer's files
# (sentencepiece, BPE, WordPiece, tokenizers' JSON) and a speech model's feature extractor.
PREPROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "source.spm", "target.spm", "normalizer.json", "preprocessor_config.json",
    "processor_config.json",
)  # fmt: skip


def copy_preprocessor_files(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer's and feature extractor's files of the model folder ``source`` into
    the export ``folder``, so that ``serfswap generate`` and Optimum's pipelines find them
    there, as they find them in Optimum's own exports; returns the names copied."""
    copied = []
    for name in PREPROCESSOR_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """transformers' eager attention meanwhile: the exporter's decompositions fail on T5's and
    BART's SDPA path with dynamic shapes ("Cannot view a tensor with shape [b, s, 4, 8] and
    strides ..." in torch 2.14), and the CLI loads models eager anyway."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def name_encoder_axes(path: Path) -> dict[str, list[str]]:
    """Name the encoder's length ``encoder_sequence`` where a decoder file takes it (the mask,
    the hidden states, the cross-attention cache) and wherever its symbol appears inside, as
    Optimum's files name it, and ``sequence`` in the encoder's mask; the exporter leaves them
    bare symbols (``s23``). Returns each input's dynamic axes, as the export report gives."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    symbols = set()
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in ("encoder_attention_mask", "encoder_hidden_states"):
            symbols.add(dims[1].dim_param)
        elif is_past(value.name) and ".encoder." in value.name:
            symbols.add(dims[2].dim_param)
    symbols.discard("")
    if symbols:
        _rename_dims(proto, symbols, "encoder_sequence")
    mask = next((v for v in proto.graph.input if v.name == "attention_mask"), None)
    if mask is not None and mask.type.tensor_type.shape.dim[1].dim_param not in ("", "sequence"):
        # the encoder's mask: transformers 4's T5 leaves its length a symbol of its own
        _rename_dims(proto, {mask.type.tensor_type.shape.dim[1].dim_param}, "sequence")
    if symbols or mask is not None:
        onnx.save(proto, str(path))
    return {
        value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        for value in proto.graph.input
        if any(d.dim_param for d in value.type.tensor_type.shape.dim)
    }


def _rename_dims(proto: Any, symbols: set[str], name: str) -> None:
    import re

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(symbols))) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(name, dim.dim_param)
