"""The tiny models the tests build from config (CPU, seconds, no download): one home for their
sizes, so that a test which wants another size says so as an argument."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

# BERT at its smallest that still has every part (attention with 2 heads, an intermediate
# layer whose odd width is no multiple of anything a kernel might assume).
TINY_BERT: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
)


def tiny_bert_config(**overrides: Any) -> Any:
    """A ``transformers.BertConfig`` of TINY_BERT's sizes, ``overrides`` on top."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
    return transformers.BertConfig(**{**TINY_BERT, **overrides})


def tiny_resnet(**kwargs: Any) -> nn.Module:
    """timm's ``test_resnet`` (timm's own tiny test architecture), random weights."""
    timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
    return timm.create_model("test_resnet", pretrained=False, **kwargs)


# LLaMA at its smallest that still has every part (grouped-query attention, a SiLU MLP of odd
# width): the causal LM of the recovery tests.
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` of TINY_LLAMA's sizes, seeded random weights."""
    import torch

    transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return transformers.LlamaForCausalLM(config).eval()
