"""Every timm test_* architecture and one model per timm family, converted and reverted; in the
slow job each test_* architecture and the families of EXPORTED_IN_CI are also exported to ONNX
and verified. The other families are exported by hand (benchmarks/zoo_export_sweep.py): its
committed result must agree with the table of known failures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .zoo.check import check_export, check_model
from .zoo.timm_zoo import (
    EXPORT_FAILURES,
    EXPORTED_IN_CI,
    FAMILIES,
    TEST_MODELS,
    build,
    sweep_results,
)

timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")


@pytest.mark.parametrize("name", TEST_MODELS)
def test_timm_test_architectures(name: str) -> None:
    check_model(*build(name))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_family(family: str) -> None:
    check_model(*build(FAMILIES[family]))


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS + EXPORTED_IN_CI)  # all families: ~1 h; docs/models.md
def test_timm_export(name: str, tmp_path: Path) -> None:
    check_export(*build(name), tmp_path / "m.onnx", EXPORT_FAILURES.get(name))


def test_sweep_agrees_with_the_failure_table() -> None:
    """Each family the hand sweep saw fail is in EXPORT_FAILURES, failing the way it says; each
    family listed there failed in the sweep or is exported in CI (so every row is measured)."""
    families = set(FAMILIES.values())
    rows = {name: row for name, row in sweep_results().items() if name in families}
    for name, row in rows.items():
        if not row["ok"]:
            assert name in EXPORT_FAILURES, f"{name} failed in the sweep: {row['first_line']}"
            assert re.search(EXPORT_FAILURES[name][0], row["message"]), (name, row["message"])
    for name in families & set(EXPORT_FAILURES):
        assert name in EXPORTED_IN_CI or (name in rows and not rows[name]["ok"]), (
            f"{name}: listed as failing, but neither exported in CI nor seen failing by "
            f"`python benchmarks/zoo_export_sweep.py --models {name}`"
        )
