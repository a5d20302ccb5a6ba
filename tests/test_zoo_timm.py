"""Every timm test_* architecture and one model per timm family, converted and reverted; in the
slow job each test_* architecture is also exported to ONNX and verified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .zoo.check import check_export, check_model
from .zoo.timm_zoo import EXPORT_FAILURES, FAMILIES, INPUT_SIZE, TEST_MODELS

timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    # num_classes=0: pooled features; several families zero-initialise their classifier.
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _, height, width = model.pretrained_cfg["input_size"]
    if name in INPUT_SIZE:
        height = width = INPUT_SIZE[name]
    return model, {"x": torch.randn(1, 3, height, width)}


@pytest.mark.parametrize("name", TEST_MODELS)
def test_timm_test_architectures(name: str) -> None:
    check_model(*build(name))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_family(family: str) -> None:
    check_model(*build(FAMILIES[family]))


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)  # families: 30-60 min more on 2 cores; see README
def test_timm_export(name: str, tmp_path: Path) -> None:
    check_export(*build(name), tmp_path / "m.onnx", EXPORT_FAILURES.get(name))
