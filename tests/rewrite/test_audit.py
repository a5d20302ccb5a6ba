"""#13: convert never reports "done" while activations it was asked to replace still run.

The run-time audit (serfswap.audit) and the string site kind, on transformers' Mamba family
(reference kernels that pick SiLU by a string and call F.silu in free functions) and on toy
models whose activations only run time shows. The counters here are the tests' own
(tests/support/probes.py), not the recorder under test."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import serfswap
from serfswap.cli.main import main
from serfswap.onnx_ops import check_graph
from serfswap.rewrite.positivity import ROLE
from tests.support import audit_helpers
from tests.support.probes import CountSerfOps, count_activation_calls

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

_MAMBA = dict(vocab_size=99, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
              conv_kernel=4)  # fmt: skip
MAMBA_FAMILY = {
    "mamba": _MAMBA,
    "falcon_mamba": _MAMBA,
    "mamba2": dict(_MAMBA, num_heads=8, head_dim=8, n_groups=1, chunk_size=8),
    "jamba": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=48, mamba_d_state=4, mamba_expand=2,
                  mamba_d_conv=4, num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
}  # fmt: skip


def mamba(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **MAMBA_FAMILY[model_type])
    return transformers.AutoModel.from_config(cfg).eval()


def silu_runs(model: nn.Module, inputs: dict) -> int:
    """F.silu calls plus SiLU-class forwards in one forward, as the test counts them."""
    hooks = []
    modules = 0

    def hook(module: nn.Module, *_: object) -> None:
        nonlocal modules
        modules += isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"

    hooks.append(nn.modules.module.register_module_forward_pre_hook(hook))
    try:
        with torch.no_grad(), count_activation_calls() as calls:
            model(**inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return calls.seen["silu"] + modules


@pytest.mark.parametrize("model_type", list(MAMBA_FAMILY))
def test_mamba_family_converts_completely(model_type: str) -> None:
    model = mamba(model_type)
    ids = {"input_ids": torch.randint(3, 99, (2, 8))}
    assert silu_runs(model, ids) > 0  # the control: the original runs SiLU
    with torch.no_grad():
        before = model(**ids).last_hidden_state

    converted = serfswap.convert(model)
    report = converted.serfswap_report
    assert report.audited and report.left == [], str(report)
    kinds = {s.kind for s in report.converted}
    assert "string" in kinds, str(report)  # activation=self.activation in the mixers
    assert silu_runs(converted, ids) == 0
    with torch.no_grad():
        after = converted(**ids).last_hidden_state
    assert torch.isfinite(after).all() and not torch.equal(after, before)

    reverted = serfswap.revert(copy.deepcopy(converted))
    with torch.no_grad():
        torch.testing.assert_close(reverted(**ids).last_hidden_state, before, rtol=0, atol=0)
    assert silu_runs(reverted, ids) == silu_runs(model, ids)


def test_the_mamba_audit_is_what_static_reading_missed() -> None:
    """Without the audit, the plan is partial (mamba_selective_scan's F.silu(z) is a free
    function): the report must say it was not audited, not that it is complete."""
    model = mamba("mamba")
    static = serfswap.convert(model, audit=False)
    assert not static.serfswap_report.audited
    assert "not audited at run time" in static.serfswap_report.summary()
    assert silu_runs(static, {"input_ids": torch.randint(3, 99, (2, 8))}) > 0
    audited = serfswap.convert(model).serfswap_report
    run_time = [s for s in audited.converted if s.kind == "run-time"]
    assert run_time and all("mamba_selective_scan" in s.where for s in run_time), str(audited)


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
def test_mamba_export_exact_pattern_and_parity(model_type: str, tmp_path: Path) -> None:
    converted = serfswap.convert(mamba(model_type))
    ids = {"input_ids": torch.randint(3, 99, (2, 8))}
    path = tmp_path / "m.onnx"
    report = serfswap.export_onnx(converted, path, ids)
    assert report.verified and max(report.max_abs_diff.values()) < 1e-4
    graph = check_graph(onnx.load(path))
    with torch.no_grad(), CountSerfOps() as serf_ops:
        converted(**ids)
    assert graph.serf == {"softplus": serf_ops.calls} == {"softplus": report.serf_nodes}
    # Mamba's own softplus (the time step's, delta_softplus) is the model's, not Serf's
    own = softplus_calls(converted, ids)
    assert graph.leftovers == ({"Softplus outside a Serf pattern": own} if own else {})


class _Softplus(TorchFunctionMode):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += func is torch.nn.functional.softplus
        return func(*args, **(kwargs or {}))


def softplus_calls(model: nn.Module, inputs: dict) -> int:
    with torch.no_grad(), _Softplus() as mode:
        model(**inputs)
    return mode.calls


class HelperModel(nn.Module):
    """Its only activation is in a helper of another module: no method of its calls one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return audit_helpers.act(self.fc(x))


def test_a_helper_in_another_module_is_reached() -> None:
    model, x = HelperModel(), torch.randn(2, 8)
    with pytest.raises(serfswap.NothingToConvertError):
        serfswap.convert(model)  # static reading alone finds nothing (the control)
    converted = serfswap.convert(model, example_inputs=x)
    report = converted.serfswap_report
    (site,) = report.converted
    assert site.kind == "run-time" and site.source == "F.gelu"
    assert site.where.startswith("audit_helpers.py:") and "in act" in site.where
    with torch.no_grad(), count_activation_calls() as calls:
        out = converted(x)
    assert calls.total == 0
    torch.testing.assert_close(out, serfswap.serf(model.fc(x)))
    assert serfswap.plan(model, example_inputs=x).sites == report.sites
    assert serfswap.revert(converted)(x).equal(model(x))


class BuildsItsActivation(nn.Module):
    """Builds an activation module during the forward that computes without any function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return audit_helpers.SigmoidGELU()(self.act(self.fc(x)))


def test_what_cannot_be_reached_is_reported_and_strict_raises() -> None:
    model, x = BuildsItsActivation(), torch.randn(2, 8)
    converted = serfswap.convert(model, example_inputs=x)
    report = converted.serfswap_report
    assert [s.name for s in report.converted] == ["act"]
    (left,) = report.left
    assert left.source == "SigmoidGELU" and left.family == "gelu" and not left.convert
    assert "PARTIAL: 1" in report.summary() and "left: reached at run time only" in str(report)

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(serfswap.PartialConversionError, match="SigmoidGELU"):
        serfswap.convert(model, example_inputs=x, strict=True, inplace=True)
    assert isinstance(model.act, nn.ReLU)  # strict leaves the model as it was
    assert all(before[k].equal(v) for k, v in model.state_dict().items())
    # Not asked for (another family): not "left"
    assert serfswap.convert(model, example_inputs=x, activations="relu").serfswap_report.left == []


class KeptAndHelper(nn.Module):
    """relu(x) + eps before a division (a positivity constraint) and a helper's F.relu in the
    same module: the helper shares the constraint's fate (scopes work per module and family)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.nn.functional.relu(x) + 1e-6
        return self.fc(x) / scale + audit_helpers.act(x) + audit_helpers.relu_act(x)


def test_run_time_sites_respect_positivity_constraints() -> None:
    model, x = KeptAndHelper(), torch.randn(2, 8)
    report = serfswap.convert(model, example_inputs=x).serfswap_report
    (kept,) = [s for s in report.sites if s.kind == "functional"]
    assert kept.role == ROLE and not kept.convert and kept.rule == "denominator"
    by_family = {s.family: s for s in report.sites if s.kind == "run-time"}
    assert not by_family["relu"].convert and "positivity constraint at" in by_family["relu"].reason
    assert by_family["gelu"].convert and "in act" in by_family["gelu"].where
    assert report.left == []
    converted = serfswap.convert(model, example_inputs=x)
    scale = torch.relu(x) + 1e-6
    expected = model.fc(x) / scale + serfswap.serf(x) + torch.relu(x)
    torch.testing.assert_close(converted(x), expected)


def test_audit_options_and_failures() -> None:
    model, x = HelperModel(), torch.randn(2, 8)
    with pytest.raises(serfswap.ExampleInputsError, match="audit=True needs example_inputs"):
        serfswap.convert(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), audit=True)
    with pytest.raises(serfswap.InvalidArgumentError, match="audit="):
        serfswap.convert(model, example_inputs=x, audit="yes")
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    bad = serfswap.convert(net, example_inputs=torch.randn(2, 3))  # the forward fails
    assert not bad.serfswap_report.audited and "mat1 and mat2" in bad.serfswap_report.audit_error
    with pytest.raises(serfswap.PartialConversionError, match="audit could not run"):
        serfswap.convert(net, example_inputs=torch.randn(2, 3), strict=True)
    model = mamba("mamba")
    state = torch.random.get_rng_state()
    serfswap.convert(model)  # inferred inputs, two forwards
    assert torch.equal(state, torch.random.get_rng_state())


def test_cli_audits_by_default(tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "mamba"
    mamba("mamba").save_pretrained(model_dir)
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "run-time" in out and "not audited" not in out and "PARTIAL" not in out
    assert main(["inspect", str(model_dir), "--no-audit"]) == 0
    assert "not audited at run time" in capsys.readouterr().out
    assert main(["convert", str(model_dir), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "run-time" in capsys.readouterr().out
