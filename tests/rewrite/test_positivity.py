"""Positivity constraints (#17): feature maps and ``relu(x) + eps`` denominators stay as they are
unless named explicitly; each rule recognises what it should and nothing in an ordinary MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import serfswap
from serfswap.errors import NothingToConvertError
from serfswap.rewrite.positivity import ROLE, source_constraints


class LinearAttention(nn.Module):
    """ReLU linear attention: phi(q) (phi(k)^T v) / (phi(q) sum(phi(k))), then an MLP."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.feature_map = nn.ReLU()
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = self.feature_map(q)
        k = self.feature_map(k)
        kv = k.transpose(-1, -2) @ v
        z = q @ k.sum(dim=1, keepdim=True).transpose(-1, -2)
        return x + self.mlp((q @ kv) / (z + 1e-6))


class GaussianHead(nn.Module):
    """A mean and a variance ``relu(x) + eps`` that the output is divided by (its sqrt)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 2 * dim))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, raw = self.body(x).chunk(2, dim=-1)
        var = self.act(raw) + 1e-3
        return (x - mean) / var.sqrt()


class FunctionalLinearAttention(nn.Module):
    """The same feature map as functional calls, beside an ordinary ``F.relu`` in a child."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.relu(q), F.relu(k)
        out = (q @ (k.transpose(-1, -2) @ v)) / (q @ k.sum(1, keepdim=True).mT + 1e-6)
        return self.out(out)


class FunctionalVariance(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.scale = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(F.relu(self.scale(x)) + 1e-3)


class OrdinaryMLP(nn.Module):
    """Activations next to divisions, sqrt and norms that do not need them non-negative."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # a norm is >= 0 whatever h is
        h = self.fc2(h)
        y = F.relu(x) - x.mean()
        y = y / y.shape[-1] ** 0.5  # the shape, not the value
        var = (h - h.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5) + y


def _site(plan: serfswap.Plan, name: str) -> serfswap.Site:
    (site,) = [s for s in plan.sites if s.name == name]
    return site


@pytest.mark.parametrize(
    ("model", "name", "rule"),
    [
        (LinearAttention(), "feature_map", "query-key"),
        (GaussianHead(), "act", "denominator"),
    ],
)
def test_kept_by_default_with_the_rule(model: nn.Module, name: str, rule: str) -> None:
    converted = serfswap.convert(model)
    report = converted.serfswap_report
    site = _site(report, name)
    assert (site.convert, site.role, site.rule) == (False, ROLE, rule)
    assert site.reason.startswith(f"positivity constraint, rule {rule}:"), site.reason
    assert "test_positivity.py:" in site.reason  # where the rule saw it
    assert type(getattr(converted, name)) is nn.ReLU
    others = [s for s in report.sites if s.name != name]
    assert others and all(s.convert and not s.role for s in others)
    text = str(report)
    assert f"skip: positivity constraint, rule {rule}" in text
    assert "note: 1 positivity constraint kept" in text
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.isfinite(converted(x)).all()


@pytest.mark.parametrize("model", [LinearAttention(), GaussianHead()], ids=["attention", "var"])
@pytest.mark.parametrize(
    "options",
    [
        {"activations": ROLE},
        {"activations": ["relu", ROLE]},
        {"include": ["*", "feature_map", "act"]},
    ],
    ids=["opt-in-alone", "opt-in-with-families", "include-names-it"],
)
def test_converted_when_named_explicitly(model: nn.Module, options: dict[str, object]) -> None:
    converted = serfswap.convert(model, **options)
    report = converted.serfswap_report
    assert all(s.convert for s in report.sites), str(report)
    assert [s.role for s in report.converted].count(ROLE) == 1
    assert "converted as asked" in str(report)
    assert not any(isinstance(m, nn.ReLU) for m in converted.modules())
    assert serfswap.revert(converted).__class__ is type(model)


def test_a_wildcard_include_does_not_name_it() -> None:
    """``"*"`` or a whole region selects sites, it does not name a feature map; nor "all"."""
    for options in ({"include": "*"}, {"activations": "all"}):
        report = serfswap.plan(LinearAttention(), **options)  # type: ignore[arg-type]
        assert not _site(report, "feature_map").convert, options
    with pytest.raises(NothingToConvertError, match=r"kept as positivity constraints: feature_map"):
        serfswap.convert(LinearAttention(), include="feature_*")
    report = serfswap.plan(LinearAttention(), include="feature_*")  # shows it, and why
    assert not report.converted and not _site(report, "feature_map").convert
    assert "kept as positivity constraints: feature_map" in report.notes[-1]


def test_include_naming_only_the_constraint() -> None:
    report = serfswap.plan(GaussianHead(), include="act")
    assert [s.name for s in report.converted] == ["act"]
    assert _site(report, "body.1").reason == "not matched by include="


def test_nothing_else_to_convert_says_why() -> None:
    model = nn.Sequential(nn.Linear(8, 8), GaussianHead())
    model[1].body[1] = nn.Tanh()  # a gate: the variance's ReLU is the only candidate left
    with pytest.raises(NothingToConvertError, match=r"positivity constraint.*1\.act.*include="):
        serfswap.convert(model)


@pytest.mark.parametrize(
    ("model", "rule"),
    [(FunctionalLinearAttention(), "query-key"), (FunctionalVariance(), "denominator")],
)
def test_functional_calls(model: nn.Module, rule: str) -> None:
    report = serfswap.plan(nn.Sequential(model, nn.GELU()), activations="all")
    sites = [s for s in report.sites if s.kind == "functional"]
    assert sites and all(s.role == ROLE and s.rule == rule and not s.convert for s in sites)
    with pytest.raises(NothingToConvertError, match=r"constraint \(\(root\)"):
        serfswap.convert(model)
    converted = serfswap.convert(model, activations=ROLE)
    assert [s.rule for s in converted.serfswap_report.converted] == [rule] * len(sites)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert not torch.equal(converted(x), model(x))


def test_functional_call_sharing_a_scope_with_a_constraint_is_kept() -> None:
    """Functional calls convert per module and function: an ordinary F.relu in the same module
    as a kept feature map would take the feature map with it, so it is kept too, and says so."""

    class Mixed(FunctionalLinearAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(super().forward(x))

    report = serfswap.plan(nn.Sequential(Mixed(), nn.GELU()))
    mixed = [s for s in report.sites if s.kind == "functional"]
    assert len(mixed) == 3 and not any(s.convert for s in mixed)
    (ordinary,) = [s for s in mixed if not s.rule]
    assert ordinary.reason.startswith("same module and function as the positivity constraint")


def test_no_false_positive_on_ordinary_activations() -> None:
    report = serfswap.plan(OrdinaryMLP(), activations="all")
    assert len(report.sites) == 2 and all(s.convert and not s.role for s in report.sites)
    assert source_constraints(OrdinaryMLP) == source_constraints(OrdinaryMLP)  # cached, stable
    assert not source_constraints(OrdinaryMLP).attributes
    assert not source_constraints(OrdinaryMLP).calls


def test_kept_module_inside_a_converted_functional_scope_stays_relu() -> None:
    """A kept nn.ReLU calls F.relu, which the scope of a converted ancestor that calls F.relu
    itself would turn into Serf at run time: the kept module gets an empty scope of its own."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.fc = LinearAttention(), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(self.attn(x)))

    converted = serfswap.convert(Block())
    assert _site(converted.serfswap_report, "attn.feature_map").rule == "query-key"
    outputs: list[torch.Tensor] = []
    converted.attn.feature_map.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        converted(torch.randn(2, 5, 8))
    assert len(outputs) == 2 and all(bool((o >= 0).all()) for o in outputs)
    assert any(bool((o == 0).any()) for o in outputs)  # ReLU's zeros, not Serf's negatives
    reverted = serfswap.revert(converted)
    assert "forward" not in reverted.attn.feature_map.__dict__
