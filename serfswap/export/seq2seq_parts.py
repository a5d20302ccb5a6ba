"""The three graphs of a seq2seq export (:mod:`serfswap.export.seq2seq`) as torch modules that
the export pipeline traces: the encoder, the decoder's first step, its later steps with the cache.

transformers takes the cache as an ``EncoderDecoderCache`` of two ``DynamicCache`` objects, which
no ONNX input can be: each wrapper builds one from flat tensors and flattens the cache it gets
back. transformers 5 calls the keyword ``cache``, transformers 4 ``past_key_values``: the wrapper
passes the one that the model's ``forward`` takes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..names import LOGITS, past_name, present_name, seq2seq_past_names


def is_speech(model: nn.Module) -> bool:
    """Whisper-style: the encoder takes ``input_features`` (log-mel frames), not token ids."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return encoder is not None and "input_features" in forward_parameters(encoder)


def forward_parameters(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


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
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


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
    speech = is_speech(model)
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
            names += seq2seq_past_names(shape.layers)
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
        def cached(i: int, kind: str) -> torch.Tensor:  # a keyword: the input name, "." -> "_"
            return past[past_name(i, kind).replace(".", "_")]

        self_layers, cross_layers = [], []
        for i in range(self.shape.layers if self.with_past else 0):
            self_layers.append((cached(i, "decoder.key"), cached(i, "decoder.value")))
            cross_layers.append((cached(i, "encoder.key"), cached(i, "encoder.value")))
        extra = {} if self.shape.speech else {"attention_mask": encoder_attention_mask}
        out = self.model(
            encoder_outputs=_encoder_output(encoder_hidden_states), decoder_input_ids=input_ids,
            use_cache=True, **{self.cache_keyword: _encoder_cache(self_layers, cross_layers)},
            **extra,
        )  # fmt: skip
        cache = _returned_cache(out)
        result = {LOGITS: out.logits}
        for i in range(self.shape.layers):
            own = cache.self_attention_cache.layers[i]
            result[present_name(i, "decoder.key")] = own.keys
            result[present_name(i, "decoder.value")] = own.values
            if not self.with_past:
                cross = cache.cross_attention_cache.layers[i]
                result[present_name(i, "encoder.key")] = cross.keys
                result[present_name(i, "encoder.value")] = cross.values
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
