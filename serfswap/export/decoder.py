"""The ``text-generation-with-past`` task: a transformers decoder as one ONNX graph with KV cache.

A decoder exported the default way recomputes its whole prefix at every generated token. This
module wraps a causal LM so that the exporter sees flat tensors in Optimum's layout: inputs
``input_ids``, ``attention_mask``, ``position_ids`` (where the model takes them) and
``past_key_values.{i}.key`` / ``.value`` of shape (batch, kv heads, past length, head dim);
outputs ``logits`` and ``present.{i}.key`` / ``.value``. The same graph serves the first step
(past length 0) and every later step, so onnxruntime generation loops written for Optimum's
files drive it unchanged.

transformers 5 takes its cache as a ``DynamicCache`` object, which no ONNX input can be: the
wrapper builds one from the flat tensors inside ``forward`` and flattens the updated cache back.
:func:`export_onnx` does the rest (staged write, graph check, verification against torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TaskError
from ..names import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    past_name,
    past_names,
    present_name,
)
from ..options import TASKS, TEXT_GENERATION_WITH_PAST


def _decoder_config(model: nn.Module) -> Any:
    """The model's config when it is a transformers causal LM that keeps a KV cache, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None  # a bare decoder stack or an encoder: no logits to generate from
    if "cache" not in _parameters(model) or (_is_encoder_family(config) and not config.is_decoder):
        return None
    return config


def _is_encoder_family(config: Any) -> bool:
    """A model type that is an encoder unless its config says ``is_decoder`` (BERT, RoBERTa:
    the masked-LM families). Decoder-only configs may carry a stale ``is_decoder=False``
    (GPT-NeoX's does), which means nothing for them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _parameters(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _model_kind(model: nn.Module) -> str:
    """What the model is, for error messages: its transformers model_type, or 'timm' and the
    architecture, or the class name."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None):
        return f"{config.model_type} ({type(model).__name__})"
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        return f"timm {cfg.get('architecture', type(model).__name__)}"
    return type(model).__name__


def check_task(model: nn.Module, task: str) -> None:
    """Raise TaskError when ``task`` is unknown or ``model`` cannot be exported for it."""
    if task not in TASKS:
        raise TaskError(f"task {task!r} is not supported: use one of {', '.join(TASKS)}")
    if task == TEXT_GENERATION_WITH_PAST and _decoder_config(model) is None:
        raise TaskError(
            f"task {task!r} needs a transformers causal LM (decoder-only, with a KV cache); "
            f"got {_model_kind(model)}"
            + (
                ": an encoder-decoder exports with --task text2text-generation-with-past "
                "(automatic-speech-recognition-with-past for Whisper)"
                if getattr(getattr(model, "config", None), "is_encoder_decoder", False)
                else ""
            )
        )


@dataclass(frozen=True)
class CacheShape:
    """One layer's cache tensor: (batch, ``heads``, past length, ``head_dim``)."""

    layers: int
    heads: int
    head_dim: int


def cache_shape(model: nn.Module) -> CacheShape:
    """The cache layout of ``model``, measured by running it once on two tokens: configs name
    heads and head sizes a dozen ways (multi-query Falcon, Gemma's head_dim, GQA)."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = out.cache.layers
    heads, head_dim = layers[0].keys.shape[1], layers[0].keys.shape[3]
    return CacheShape(len(layers), heads, head_dim)


class DecoderWithPast(nn.Module):
    """``model`` with flat cache tensors in and out, in Optimum's layout.

    ``forward(input_ids, attention_mask, position_ids, **past)`` takes each layer's cache as
    keywords ``past_key_values_{i}_key`` / ``_value`` (torch's graphs need identifiers; the
    ONNX file names them ``past_key_values.{i}.key``, see :attr:`onnx_input_names`) and returns
    a dict of ``logits`` and ``present.{i}.key`` / ``.value`` (past and new positions together).
    ``position_ids`` is left out for models that do not take it (Bloom: ALiBi).
    """

    def __init__(self, model: nn.Module, shape: CacheShape) -> None:
        super().__init__()
        self.model = model
        self.shape = shape
        self.takes_position_ids = POSITION_IDS in _parameters(model)

    @property
    def onnx_input_names(self) -> list[str]:
        """The graph's inputs as the ONNX file names them (Optimum's names), in order."""
        names = [INPUT_IDS, ATTENTION_MASK]
        if self.takes_position_ids:
            names.append(POSITION_IDS)
        return names + past_names(self.shape.layers)

    @property
    def input_names(self) -> list[str]:
        """The same inputs as :meth:`forward` takes them: identifiers."""
        return [_identifier(name) for name in self.onnx_input_names]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        **past: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        from transformers import DynamicCache

        layers = [
            (past[_identifier(past_name(i, "key"))], past[_identifier(past_name(i, "value"))])
            for i in range(self.shape.layers)
        ]
        # Plain DynamicLayers, not the config's (sliding-window layers crop with data-dependent
        # slices): the present holds every position, and the mask applies any window.
        extra = {POSITION_IDS: position_ids} if self.takes_position_ids else {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=DynamicCache(layers),
            use_cache=True, **extra,
        )  # fmt: skip
        result = {LOGITS: out.logits}
        for i, layer in enumerate(out.cache.layers):
            result[present_name(i, "key")] = layer.keys
            result[present_name(i, "value")] = layer.values
        return result

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return example_inputs(self)

    def verification_inputs(self) -> list[dict[str, torch.Tensor]]:
        return verification_inputs(self)

    def dynamic_shapes(self) -> dict[str, Any]:
        return dynamic_shapes(self)


def _identifier(name: str) -> str:
    """An ONNX input name as a keyword of :meth:`DecoderWithPast.forward`:
    ``past_key_values.0.key`` -> ``past_key_values_0_key``."""
    return name.replace(".", "_")


def position_ids_for(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The positions transformers' ``generate`` gives the last ``length`` tokens: the count of
    real tokens before each one (left padding does not count), 0 on padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -length:]


def decoder_inputs(
    wrapper: DecoderWithPast, *, batch: int, seq: int, past: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs for ``wrapper``: random tokens and cache, a full mask, generate's positions."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        INPUT_IDS: torch.randint(0, vocab, (batch, seq), generator=generator),
        ATTENTION_MASK: torch.ones(batch, past + seq, dtype=torch.long),
    }
    if wrapper.takes_position_ids:
        inputs[POSITION_IDS] = position_ids_for(inputs[ATTENTION_MASK], seq)
    shape = wrapper.shape
    for name in wrapper.input_names[len(inputs) :]:
        inputs[name] = torch.randn(batch, shape.heads, past, shape.head_dim, generator=generator)
    return inputs


def dynamic_shapes(wrapper: DecoderWithPast) -> dict[str, Any]:
    """Dynamic batch, sequence and past length, as torch.export wants them for ``forward``."""
    auto = torch.export.Dim.AUTO
    shapes: dict[str, Any] = {INPUT_IDS: {0: auto, 1: auto}, ATTENTION_MASK: {0: auto, 1: auto}}
    if wrapper.takes_position_ids:
        shapes[POSITION_IDS] = {0: auto, 1: auto}
    for name in wrapper.input_names[len(shapes) :]:
        shapes[name] = {0: auto, 2: auto}
    return shapes


def with_past(model: nn.Module) -> DecoderWithPast:
    """``model`` (a transformers causal LM) wrapped for the ``text-generation-with-past``
    export; TaskError for any other model."""
    check_task(model, TEXT_GENERATION_WITH_PAST)
    return DecoderWithPast(model, cache_shape(model))


def example_inputs(wrapper: DecoderWithPast) -> dict[str, torch.Tensor]:
    """What the export traces: batch 2, 5 new tokens after 3 cached ones. Sizes above 1 and
    all different: the tracer specialises sizes 0 and 1, and may merge equal ones."""
    return decoder_inputs(wrapper, batch=2, seq=5, past=3, vocab=_vocab(wrapper))


def verification_inputs(wrapper: DecoderWithPast) -> list[dict[str, torch.Tensor]]:
    """What the export is verified on: another batch (3), at the first step (4 tokens, no
    past) and at a later one (1 token after 7), with other tokens and cache than traced."""
    vocab = _vocab(wrapper)
    return [
        decoder_inputs(wrapper, batch=3, seq=4, past=0, vocab=vocab, seed=1),
        decoder_inputs(wrapper, batch=3, seq=1, past=7, vocab=vocab, seed=2),
    ]


def _vocab(wrapper: DecoderWithPast) -> int:
    head = wrapper.model.get_output_embeddings()
    return min(int(head.weight.shape[0]), 1000)
