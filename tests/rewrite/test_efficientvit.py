"""timm's EfficientViT (MIT): its ReLU linear-attention feature maps (``LiteMLA.kernel_func``) stay
ReLU, every other activation becomes Serf, and the ONNX export verifies (#17)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import serfswap
from serfswap.errors import ExportMismatchError, NothingToConvertError
from serfswap.rewrite.activations import GATE
from serfswap.rewrite.positivity import ROLE, source_constraints

timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")

# b0 / b1 use Hardswish elsewhere (not a default family: "all" converts it), l1 GELU (default).
MODELS = {"efficientvit_b0": "all", "efficientvit_b1": "all", "efficientvit_l1": None}
SIZE = 64  # any multiple of 32 runs; the smallest keeps CPU time low


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


def kernel_funcs(model: nn.Module) -> list[str]:
    return [f"{n}.kernel_func" for n, m in model.named_modules() if type(m).__name__ == "LiteMLA"]


@pytest.mark.parametrize("name", list(MODELS))
def test_feature_maps_kept_everything_else_converted(name: str) -> None:
    model = build(name)
    converted = serfswap.convert(model, activations=MODELS[name])
    report = converted.serfswap_report
    kept = {s.name for s in report.skipped if s.role == ROLE}
    assert kept == set(kernel_funcs(model)) and kept
    for site in report.sites:
        if site.name in kept:
            assert (site.rule, site.kind, site.source) == ("known", "module", "nn.ReLU")
            assert site.reason.startswith("positivity constraint, rule known: ReLU linear")
        else:  # every other activation is converted; gates stay
            assert site.convert or site.family == GATE, site
    for module_name in kept:
        assert type(converted.get_submodule(module_name)) is nn.ReLU
    assert not any(
        isinstance(m, nn.Hardswish | nn.GELU | timm.layers.activations.GELUTanh)
        for m in converted.modules()
    )
    assert "skip: positivity constraint, rule known" in str(report)
    with torch.no_grad():
        out = converted(torch.randn(2, 3, SIZE, SIZE))
    assert torch.isfinite(out).all()


def test_the_source_rule_alone_recognises_litemla() -> None:
    """``known`` is the safety net; the ``query-key`` rule reads the same fact from the source."""
    from timm.models.efficientvit_mit import LiteMLA

    constraint = source_constraints(LiteMLA).attributes["kernel_func"]
    assert constraint.rule == "query-key"
    assert "LiteMLA.forward" in constraint.where


def test_default_families_of_b0_are_only_feature_maps() -> None:
    """b0's only default-family activations are its feature maps: converting nothing says why."""
    with pytest.raises(NothingToConvertError, match=r"positivity constraint.*kernel_func"):
        serfswap.convert(build("efficientvit_b0"))


def test_feature_maps_converted_when_named() -> None:
    model = build("efficientvit_b0")
    by_include = serfswap.plan(model, include="*.kernel_func")
    assert {s.name for s in by_include.converted} == set(kernel_funcs(model))
    by_role = serfswap.plan(model, activations=["all", ROLE])
    assert {s.name for s in by_role.converted} >= set(kernel_funcs(model))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_export_verifies(name: str, tmp_path: Path) -> None:
    converted = serfswap.convert(build(name), activations=MODELS[name])
    report = serfswap.export_onnx(
        converted, tmp_path / "m.onnx", example_inputs={"x": torch.randn(1, 3, SIZE, SIZE)}
    )
    assert report.verified and report.serf_nodes == len(converted.serfswap_report.converted)
    # Each kept feature map runs twice, on q and on k: two Relu nodes.
    assert report.leftovers == {"Relu": 2 * len(kernel_funcs(converted))}


@pytest.mark.slow
def test_export_fails_when_the_feature_maps_are_converted(tmp_path: Path) -> None:
    """The control: what #17 reported, so the test above can fail for the reason it guards."""
    converted = serfswap.convert(build("efficientvit_b0"), activations=["all", ROLE])
    with pytest.raises(ExportMismatchError, match="max abs diff"):
        serfswap.export_onnx(
            converted, tmp_path / "m.onnx", example_inputs={"x": torch.randn(1, 3, SIZE, SIZE)}
        )
