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

transformers takes the cache as an ``EncoderDecoderCache`` of two ``DynamicCache`` objects, which
no ONNX input can be: each wrapper builds one from flat tensors and flattens the cache it gets
back. transformers 5 calls the keyword ``cache``, transformers 4 ``past_key_values``: the wrapper
passes the one that the model's ``forward`` takes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, TaskError
from ..runtime.seq2seq import DECODER_FILE, ENCODER_FILE, WITH_PAST_FILE

TEXT2TEXT = "text2text-generation-with-past"
SPEECH = "automatic-speech-recognition-with-past"
SEQ2SEQ_TASKS = (TEXT2TEXT, SPEECH)


def _kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None):
        return f"{config.model_type} ({type(model).__name__})"
    return type(model).__name__


def _is_speech(model: nn.Module) -> bool:
    """Whisper-style: the encoder takes ``input_features`` (log-mel frames), not token ids."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return encoder is not None and "input_features" in _parameters(encoder)


def _parameters(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def check_seq2seq_task(model: nn.Module, task: str) -> None:
    """TaskError unless ``model`` is a transformers encoder-decoder with a language-model head
    and a KV cache, of the kind ``task`` names (text encoder or speech encoder)."""
    config = getattr(model, "config", None)
    seq2seq = (
        getattr(config, "is_encoder_decoder", False)
        and hasattr(model, "get_encoder")
        and getattr(model, "get_output_embeddings", lambda: None)() is not None
        and {"encoder_outputs", "decoder_input_ids"} <= _parameters(model)
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
    speech = _is_speech(model)
    if speech != (task == SPEECH):
        other = SPEECH if speech else TEXT2TEXT
        raise TaskError(
            f"task {task!r} does not fit {_kind(model)}, whose encoder takes "
            f"{'input_features' if speech else 'input_ids'}: use --task {other}"
        )


# The wrappers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What the wrappers need to know about the model: the decoder's layers, heads, head size,
    and the encoder's hidden size and (speech) input shape."""

    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int
    speech: bool
    features: tuple[int, int] | None = None  # (mel bins, frames): Whisper's are fixed


def _cache_keyword(model: nn.Module) -> str:
    return "cache" if "cache" in _parameters(model) else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _encoder_cache(self_layers: list[Any], cross_layers: list[Any]) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    def dynamic(layers: list[Any]) -> Any:
        return DynamicCache(layers) if layers else DynamicCache()

    return EncoderDecoderCache(dynamic(self_layers), dynamic(cross_layers))


def layout(model: nn.Module) -> Layout:
    """The cache layout of ``model``, measured by one decoder step on a 2-long encoder output
    (configs name heads and sizes many ways: ``d_kv`` in T5, ``decoder_attention_heads``...)."""
    speech = _is_speech(model)
    config = model.config
    hidden = int(getattr(config, "d_model", None) or config.hidden_size)
    features = None
    if speech:
        frames = 2 * int(config.max_source_positions)  # two stride-2 convolutions in Whisper
        features = (int(config.num_mel_bins), frames)
    encoder_out = _encoder_output(torch.zeros(1, 2, hidden))
    start = torch.zeros(1, 1, dtype=torch.long)
    extra = {} if speech else {"attention_mask": torch.ones(1, 2, dtype=torch.long)}
    with torch.no_grad():
        out = model(encoder_outputs=encoder_out, decoder_input_ids=start, use_cache=True,
                    **{_cache_keyword(model): _encoder_cache([], [])}, **extra)  # fmt: skip
    keys = _returned_cache(out).self_attention_cache.layers
    heads, head_dim = keys[0].keys.shape[1], keys[0].keys.shape[3]
    vocab = int(out.logits.shape[-1])
    return Layout(len(keys), heads, head_dim, hidden, vocab, speech, features)


def _encoder_output(hidden: torch.Tensor) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=hidden)


class Seq2SeqPart(nn.Module):
    """One of the three graphs: the inputs it takes (as identifiers for ``forward``, as Optimum
    names them in the file), its example and verification inputs, its dynamic shapes. The export
    pipeline takes a part as it takes the decoder task's wrapper."""

    onnx_input_names: list[str]

    def __init__(self, model: nn.Module, shape: Layout) -> None:
        super().__init__()
        self.model = model
        self.shape = shape

    @property
    def input_names(self) -> list[str]:
        return [name.replace(".", "_") for name in self.onnx_input_names]

    def inputs(self, *, batch: int, encoder: int, seq: int, past: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """What the export traces: sizes above 1 and all different (the tracer specialises 0
        and 1, and may merge equal sizes)."""
        return self.inputs(batch=2, encoder=5, seq=3, past=4, seed=0)

    def verification_inputs(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def dynamic_shapes(self) -> dict[str, Any]:
        raise NotImplementedError


def _padded_mask(batch: int, length: int) -> torch.Tensor:
    """All ones but the last row, whose last two positions are padding."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, -2:] = 0
    return mask


class EncoderPart(Seq2SeqPart):
    """``encoder_model.onnx``: token ids and mask (or log-mel features) -> last_hidden_state."""

    def __init__(self, model: nn.Module, shape: Layout) -> None:
        super().__init__(model.get_encoder(), shape)
        self.onnx_input_names = (
            ["input_features"] if shape.speech else ["input_ids", "attention_mask"]
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.shape.speech:
            out = self.model(input_features=input_features)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return {"last_hidden_state": out.last_hidden_state}

    def inputs(self, *, batch: int, encoder: int, seq: int, past: int, seed: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        if self.shape.speech:
            bins, frames = self.shape.features or (0, 0)
            return {"input_features": torch.randn(batch, bins, frames, generator=generator)}
        vocab = min(self.shape.vocab, 1000)
        return {
            "input_ids": torch.randint(0, vocab, (batch, encoder), generator=generator),
            "attention_mask": _padded_mask(batch, encoder),
        }

    def verification_inputs(self) -> list[dict[str, torch.Tensor]]:
        return [self.inputs(batch=3, encoder=7, seq=1, past=0, seed=1)]

    def dynamic_shapes(self) -> dict[str, Any]:
        auto = torch.export.Dim.AUTO
        if self.shape.speech:  # Whisper's encoder takes exactly 2 * max_source_positions frames
            return {"input_features": {0: auto}}
        return {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}}


def _named_forward(step: Any, names: list[str]) -> Any:
    """``step`` (which takes the cache as ``**past``) as a forward whose signature names every
    input: torch.export writes its shape guards with the signature's names, and guards on a
    ``**past`` entry (``L['past']['past_key_values_0_encoder_key']``) name no input of the
    graph it builds (torch 2.14: "name 'L' is not defined" at the first decomposition)."""

    def forward(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return step(**inputs)

    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, keyword) for name in names]
    )
    return forward


def _past_names(layers: int, prefix: str, parts: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for part in parts
            for kv in ("key", "value")]  # fmt: skip


class DecoderPart(Seq2SeqPart):
    """``decoder_model.onnx`` (``with_past=False``: the first step, no cache in, the whole cache
    out) or ``decoder_with_past_model.onnx`` (the cache in, the decoder's new cache out).

    ``forward(input_ids, encoder_attention_mask, encoder_hidden_states, **past)`` runs the whole
    model with ``encoder_outputs`` given (its encoder does not run): each model's own head, T5's
    rescaling of tied embeddings, BART's ``final_logits_bias``, Whisper's ``proj_out``.
    """

    def __init__(self, model: nn.Module, shape: Layout, *, with_past: bool) -> None:
        super().__init__(model, shape)
        self.with_past = with_past
        names = ["input_ids"] + ([] if shape.speech else ["encoder_attention_mask"])
        names.append("encoder_hidden_states")
        if with_past:
            names += _past_names(shape.layers, "past_key_values", ("decoder", "encoder"))
        self.onnx_input_names = names
        self.cache_keyword = _cache_keyword(model)
        self.forward = _named_forward(self._step, self.input_names)

    def _step(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        **past: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        self_layers, cross_layers = [], []
        for i in range(self.shape.layers if self.with_past else 0):
            self_layers.append((past[f"past_key_values_{i}_decoder_key"],
                                past[f"past_key_values_{i}_decoder_value"]))  # fmt: skip
            cross_layers.append((past[f"past_key_values_{i}_encoder_key"],
                                 past[f"past_key_values_{i}_encoder_value"]))  # fmt: skip
        extra = {} if self.shape.speech else {"attention_mask": encoder_attention_mask}
        out = self.model(
            encoder_outputs=_encoder_output(encoder_hidden_states), decoder_input_ids=input_ids,
            use_cache=True, **{self.cache_keyword: _encoder_cache(self_layers, cross_layers)},
            **extra,
        )  # fmt: skip
        cache = _returned_cache(out)
        result = {"logits": out.logits}
        for i in range(self.shape.layers):
            own = cache.self_attention_cache.layers[i]
            result[f"present.{i}.decoder.key"] = own.keys
            result[f"present.{i}.decoder.value"] = own.values
            if not self.with_past:
                cross = cache.cross_attention_cache.layers[i]
                result[f"present.{i}.encoder.key"] = cross.keys
                result[f"present.{i}.encoder.value"] = cross.values
        return result

    def inputs(self, *, batch: int, encoder: int, seq: int, past: int, seed: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        shape = self.shape
        inputs: dict[str, Any] = {
            "input_ids": torch.randint(0, min(shape.vocab, 1000), (batch, seq), generator=generator)
        }
        if not shape.speech:
            inputs["encoder_attention_mask"] = _padded_mask(batch, encoder)
        inputs["encoder_hidden_states"] = torch.randn(batch, encoder, shape.hidden,
                                                      generator=generator)  # fmt: skip
        for name in self.input_names[len(inputs) :]:
            length = encoder if "_encoder_" in name else past
            inputs[name] = torch.randn(batch, shape.heads, length, shape.head_dim,
                                       generator=generator)  # fmt: skip
        return inputs

    def verification_inputs(self) -> list[dict[str, torch.Tensor]]:
        """Another batch and encoder length than traced; the first step at decoder lengths 1
        and 4, the later steps at past lengths 2 and 7."""
        if self.with_past:
            return [self.inputs(batch=3, encoder=6, seq=1, past=p, seed=p) for p in (2, 7)]
        return [self.inputs(batch=3, encoder=6, seq=s, past=0, seed=s) for s in (1, 4)]

    def dynamic_shapes(self) -> dict[str, Any]:
        auto = torch.export.Dim.AUTO
        shapes: dict[str, Any] = {}
        for name in self.input_names:
            shapes[name] = {0: auto, 2: auto} if name.startswith("past_") else {0: auto, 1: auto}
        return shapes


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
    from ..rewrite.convert import convert
    from .pipeline import export_onnx

    if not isinstance(model, nn.Module):
        raise ExportError(f"task {task!r} needs a transformers model, not {type(model).__name__}")
    check_seq2seq_task(model, task)
    _check_options(task, example_inputs, dynamic, exporter)
    folder = check_output_folder(path)
    if convert_activations:
        model = convert(model)
    model = model.eval()
    shape = layout(model)
    parts = {
        ENCODER_FILE: EncoderPart(model, shape),
        DECODER_FILE: DecoderPart(model, shape, with_past=False),
        WITH_PAST_FILE: DecoderPart(model, shape, with_past=True),
    }
    report = Seq2SeqExportReport(folder, task)
    staging = folder.parent / f".serfswap-{secrets.token_hex(8)}"
    try:
        staging.mkdir(0o700)
        with eager_attention(model):
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
    Optimum's files name it; the exporter leaves it a bare symbol (``s23``). Returns each
    input's dynamic axes, as the export report gives them."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    symbols = set()
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in ("encoder_attention_mask", "encoder_hidden_states"):
            symbols.add(dims[1].dim_param)
        elif value.name.startswith("past_key_values.") and ".encoder." in value.name:
            symbols.add(dims[2].dim_param)
    symbols.discard("")
    if symbols:
        _rename_dims(proto, symbols, "encoder_sequence")
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
