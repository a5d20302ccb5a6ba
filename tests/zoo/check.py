"""The zoo's checks: plan finds every activation, convert leaves none but the positivity
constraints, revert is exact (:func:`check_model`); the default conversion exports to ONNX and
verifies against torch (:func:`check_export`, the slow job)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import serfswap
from serfswap.rewrite.activations import GATE, class_family
from serfswap.rewrite.positivity import ROLE

from ..support.probes import count_activation_calls


def tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, a tuple, a dict or a HuggingFace ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in tensors(v)]
    return []


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return tensors(model(**inputs))


def original_activation_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if class_family(type(m)) not in (None, GATE)]


# Every family, and the positivity constraints too: the finder must reach every activation.
EVERYTHING = ["all", ROLE]


def prepare(model: nn.Module) -> nn.Module:
    """Eval mode, and no all-zero tensor: zero-initialised residual branches (Swin V2's
    post-norms) or heads make a fresh model's output independent of its activations."""
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    return model


def check_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> serfswap.Plan:
    """Convert every activation and check the round trip; returns the report."""
    prepare(model)
    with torch.no_grad():
        before = run(model, inputs)
    plan = serfswap.plan(model, activations=EVERYTHING, audit=False)  # the static walk
    assert plan.converted, "the plan found no activation"
    modules = original_activation_modules(model)
    planned = {
        n for s in plan.converted if s.kind in ("module", "norm-act") for n in (s.name, *s.aliases)
    }
    assert set(modules) <= planned, f"plan missed {set(modules) - planned}"
    # The default rules keep exactly the positivity constraints.
    by_default = serfswap.plan(model, activations="all", audit=False)
    kept = sorted(s.name for s in by_default.skipped if s.role == ROLE and s.kind == "module")
    default = (
        serfswap.convert(model, activations="all", audit=False) if by_default.converted else model
    )
    assert sorted(original_activation_modules(default)) == kept

    converted = serfswap.convert(model, activations=EVERYTHING, example_inputs=inputs)
    report = converted.serfswap_report
    assert report.audited and report.left == [], str(report)  # #13: never silently partial
    assert original_activation_modules(converted) == []
    with torch.no_grad(), count_activation_calls() as calls:
        after = run(converted, inputs)
    assert calls.total == 0, f"calls left after convert: {dict(calls.seen)}"
    # Exact comparison: fresh models with layer scale (ConvNeXt: 1e-6) or vanishing features
    # (Inception-v4: 1e-9) change by little; the probe above is the structural proof.
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), (
        "outputs unchanged: the swap did not happen"
    )

    # Backward in eval mode: a train-mode forward would update BatchNorm statistics.
    loss = sum(t.float().square().mean() for t in run(converted, inputs))
    loss.backward()
    grads = [p.grad for p in converted.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    reverted = serfswap.revert(copy.deepcopy(converted)).eval()
    with torch.no_grad():
        back = run(reverted, inputs)
    for a, b in zip(back, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return converted.serfswap_report


def check_export(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    expected_failure: tuple[str, str] | None = None,
) -> serfswap.ExportReport | None:
    """Convert with the defaults a user gets for every family (positivity constraints kept) and
    export with ``export_onnx``'s defaults (dynamic batch, verification at 1e-4).

    ``expected_failure`` is ``(regex, reason)`` from the zoo's table of known failures: the
    export must then fail with a message that matches, so a fixed failure is noticed too.
    """
    converted = serfswap.convert(prepare(model), activations="all")
    # Batch 2, as export_onnx infers for timm: an example of batch 1 lets the exporter bake the
    # batch into a reshape (test_coatnet then fails on onnxruntime's fresh batch, 2 passes).
    inputs = {k: torch.randn(2, *v.shape[1:], dtype=v.dtype) for k, v in inputs.items()}
    if expected_failure is None:
        report = serfswap.export_onnx(converted, path, example_inputs=inputs)
        assert report.verified
        return report
    pattern, reason = expected_failure
    with pytest.raises(Exception) as caught:  # the table's regex says which
        serfswap.export_onnx(converted, path, example_inputs=inputs)
    assert re.search(pattern, str(caught.value)), (
        f"failed otherwise than {reason!r}: {caught.value}"
    )
    return None
