"""Example inputs for a model: inferred from a timm or transformers model's own configuration,
or given by the caller as a tensor, a tuple or a dict, and normalised to keyword tensors.

Two consumers need them: the run-time audit of :func:`serfswap.convert` (one forward that
lists the activations still running) and :func:`serfswap.export_onnx` (the export's example
and the verification's reference). Both accept the same forms and infer the same way.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from .errors import ExampleInputsError, Words
from .names import ATTENTION_MASK, DECODER_INPUT_IDS, INPUT_IDS, TOKEN_TYPE_IDS


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``."""
    return name in inspect.signature(model.forward).parameters


def can_infer(model: nn.Module) -> bool:
    """Whether :func:`example_inputs_for` knows how to build inputs for ``model``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return True
    return getattr(model, "config", None) is not None and hasattr(model, "main_input_name")


def timm_channels(model: nn.Module) -> int:
    """The input channels a timm model takes. Its ``pretrained_cfg`` says 3 even when it was
    built with ``in_chans=1``: the first convolution's weight knows, so it is read first."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = int(cfg.get("input_size", (3,))[0])
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, list | tuple) and first else first
    with contextlib.suppress(AttributeError, TypeError):
        weight = model.get_parameter(f"{first}.weight")
        channels = int(weight.shape[1]) if weight.dim() == 4 else channels
    return channels


def example_inputs_for(
    model: nn.Module, *, batch: int = 2, seq: int = 8
) -> dict[str, torch.Tensor]:
    """Inputs a timm or transformers model can run on, from its own configuration.

    Raises ExampleInputsError for a plain module: its inputs cannot be guessed.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:  # timm
        _, *size = cfg["input_size"]
        return {"x": torch.randn(batch, timm_channels(model), *size)}
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise ExampleInputsError(
            f"cannot infer example inputs for a {type(model).__name__}: pass {{example_inputs}}",
            option="example_inputs",
            example_inputs=_PASS_INPUTS,
        )
    vision = getattr(config, "vision_config", config)
    inputs: dict[str, torch.Tensor] = {}
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None) or 100
    if main == INPUT_IDS or (accepts(model, INPUT_IDS) and main != "pixel_values"):
        inputs[INPUT_IDS] = torch.randint(3, min(vocab, 1000), (batch, seq))
        if accepts(model, ATTENTION_MASK):
            inputs[ATTENTION_MASK] = torch.ones(batch, seq, dtype=torch.long)
        if accepts(model, TOKEN_TYPE_IDS) and getattr(config, "type_vocab_size", 0):
            # what a tokenizer gives BERT-style models: the file takes the tokenizer's dict
            inputs[TOKEN_TYPE_IDS] = torch.zeros(batch, seq, dtype=torch.long)
    if main == "pixel_values" or (accepts(model, "pixel_values") and INPUT_IDS in inputs):
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, height, width)
    if main == "input_values":
        inputs["input_values"] = torch.randn(batch, 16000)
    if main == "input_features":
        inputs["input_features"] = _input_features(config, batch, seq)
    if getattr(config, "is_encoder_decoder", False) and accepts(model, DECODER_INPUT_IDS):
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs[DECODER_INPUT_IDS] = torch.full((batch, max(seq // 2, 2)), start)
    if not inputs:
        raise ExampleInputsError(
            f"cannot infer example inputs for main input {main!r}: pass example_inputs"
        )
    return inputs


# What to pass when inputs cannot be inferred, in the API's words and the command line's.
_PASS_INPUTS = Words(
    "example_inputs (a tensor, a tuple of tensors or a dict of keyword tensors)",
    "--input-shape, e.g. --input-shape 1,3,224,224",
)


def _input_features(config: Any, batch: int, seq: int) -> torch.Tensor:
    """Audio features, in the layout each family's config describes: Whisper's log-mel
    spectrogram ``[batch, num_mel_bins, 2 * max_source_positions]`` (its length is fixed);
    Speech2Text's filter banks ``[batch, frames, input_feat_per_channel * input_channels]``,
    frames being halved by each convolution; Wav2Vec2-BERT's and SeamlessM4T's
    ``[batch, frames, feature_projection_input_dim]``."""
    if hasattr(config, "num_mel_bins"):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return torch.randn(batch, config.num_mel_bins, frames)
    frames = 2 ** getattr(config, "num_conv_layers", 2) * seq
    if hasattr(config, "input_feat_per_channel"):
        width = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        return torch.randn(batch, frames, width)
    if hasattr(config, "feature_projection_input_dim"):
        return torch.randn(batch, frames, config.feature_projection_input_dim)
    raise ExampleInputsError(
        f"cannot infer input_features for a {type(config).__name__} (its config names no "
        "feature size serfswap knows): pass example_inputs"
    )


def as_kwargs(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """``example_inputs`` (a tensor, a tuple of positional tensors or a dict) as keywords of
    ``model.forward``."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, list | tuple):
        names = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(names) < len(example_inputs):
            raise ExampleInputsError(
                f"{len(example_inputs)} example inputs for forward({', '.join(names)})"
            )
        return dict(zip(names, example_inputs, strict=False))
    raise ExampleInputsError(
        f"example_inputs must be a tensor, a tuple or a dict, not {type(example_inputs).__name__}"
    )
