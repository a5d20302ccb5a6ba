"""A decoder as deep and as large in magnitude as a trained one, without a hub: SmolLM-135M's
shape (30 LLaMA layers, width 576, 9 query / 3 key-value heads; the vocabulary cut to 2048) with
random weights scaled by ``scale``, which sets the magnitudes (8: logits near 19)."""

from __future__ import annotations

import torch


def smollm_shaped(layers: int = 30, scale: float = 8.0) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=576, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(scale)
    return model
