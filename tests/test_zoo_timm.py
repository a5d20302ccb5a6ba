"""Every timm test_* architecture and one model per timm family, converted and reverted; in the
slow job each test_* architecture is also exported to ONNX and verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from .zoo.check import check_export, check_model
from .zoo.timm_zoo import EXPORT_FAILURES, FAMILIES, TEST_MODELS, build

timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")


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
