"""HuggingFace transformers models from config, converted and reverted; config round trip."""

from __future__ import annotations

import pytest
import torch

from .zoo.check import check_model
from .zoo.hf_zoo import MODELS, config, inputs

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def build(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = config(model_type)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    return model, inputs(model_type, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(MODELS))
def test_hf_model(model_type: str) -> None:
    check_model(*build(model_type))
