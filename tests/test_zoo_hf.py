"""HuggingFace transformers models from config, converted and reverted; config round trip."""

from __future__ import annotations

import pytest
import torch

from .zoo.check import check_model
from .zoo.hf_zoo import EXPORT_FAILS, MODELS, config, inputs

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


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(MODELS))
def test_hf_export(model_type: str, tmp_path) -> None:
    """Every zoo type, converted, gets a verified ONNX file with dynamic batch and sequence;
    the few that cannot are listed in EXPORT_FAILS (and docs/models.md) and still fail."""
    import serfswap

    model, batch = build(model_type)
    converted = serfswap.convert(model, activations="all")
    path = tmp_path / "m.onnx"
    if model_type in EXPORT_FAILS:
        with pytest.raises(serfswap.ExportError):
            serfswap.export_onnx(converted, path, batch)
        assert not path.exists()
        return
    report = serfswap.export_onnx(converted, path, batch)
    assert report.verified and path.is_file()
    assert report.fallback is None, report.fallback
    assert all("batch" in axes for axes in report.dynamic_axes.values()), report.dynamic_axes
