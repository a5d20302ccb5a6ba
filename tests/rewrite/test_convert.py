"""plan / convert / revert on toy models, one per structural case."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import serfswap
from serfswap.rewrite.functional import FunctionalScope
from tests.support.probes import count_activation_calls


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh")) for _ in range(3)]
        )
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 8), nn.SiLU())})
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.heads["a"](x) * self.gate(x)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.a = nn.Sequential(nn.Linear(8, 8), self.act)
        self.b = nn.Sequential(nn.Linear(8, 8), self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class FunctionalInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x)) + self.fc(x).relu()


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.inner = FunctionalInner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(x))
        x = self.inner(x)
        return F.silu(x, inplace=False) + F.relu(x.clone(), inplace=True)


class AttributeFn(nn.Module):
    """A function stored as a plain attribute, as timm's GammaAct and torch's Transformer do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act_fn = F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.fc(x))


class GatedMLP(nn.Module):
    """LLaMA's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(8, 16)
        self.up_proj = nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.hs = nn.Hardswish()
        self.prelu = nn.PReLU()
        self.tanh = nn.Tanh()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.hs(self.act(self.fc(x))))
        return self.softmax(self.tanh(x))


TOYS = {
    "root": lambda: nn.GELU(),
    "nested": Nested,
    "shared": Shared,
    "functional": Functional,
    "attribute": AttributeFn,
    "gated": GatedMLP,
    "mixed": Mixed,
    "transformer_layer": lambda: nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, batch_first=True
    ),
}


def toy_input(name: str) -> torch.Tensor:
    x = torch.randn(4, 3, 8) if name == "transformer_layer" else torch.randn(4, 8)
    return x.requires_grad_()


@pytest.mark.parametrize("name", list(TOYS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_then_revert(name: str, mode: str) -> None:
    """The swap happens, leaves no original activation call, and revert is bit-identical."""
    model = TOYS[name]().train(mode == "train")
    x = toy_input(name)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    converted = serfswap.convert(model)
    assert converted is not model
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the original is untouched
    with count_activation_calls() as calls:
        after = converted(x)
    assert calls.total == 0, calls.seen
    assert not torch.allclose(after, before)
    after.sum().backward()
    assert converted.serfswap_report.applied and converted.serfswap_report.converted
    reverted = serfswap.revert(converted)
    torch.testing.assert_close(reverted(x), before, rtol=0, atol=0)
    assert all(torch.equal(v, reverted.state_dict()[k]) for k, v in state.items())
    assert not hasattr(reverted, "serfswap_report")


def test_root_activation_becomes_serf() -> None:
    converted = serfswap.convert(nn.ReLU())
    assert isinstance(converted, serfswap.Serf)
    assert isinstance(serfswap.revert(converted), nn.ReLU)


def test_shared_instance_stays_shared() -> None:
    converted = serfswap.convert(Shared())
    assert converted.a[1] is converted.b[1] is converted.act
    assert isinstance(converted.act, serfswap.Serf)
    (site,) = converted.serfswap_report.converted
    assert site.name == "act" and set(site.aliases) == {"a.1", "b.1"}
    reverted = serfswap.revert(converted)
    assert reverted.a[1] is reverted.b[1] is reverted.act and isinstance(reverted.act, nn.ReLU)


def test_inplace_converts_the_given_model() -> None:
    model = Nested()
    assert serfswap.convert(model, inplace=True) is model
    assert isinstance(model.stem[1], serfswap.Serf) and model.stem[1].inplace


def test_plan_changes_nothing_and_lists_every_kind() -> None:
    model = Functional()
    x = torch.randn(2, 8)
    before = model(x)
    plan = serfswap.plan(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert "forward" not in vars(model) and not plan.applied
    functional = [s for s in plan.sites if s.kind == "functional"]
    assert {s.source for s in functional} == {"torch.relu", "F.silu", "F.relu", "F.gelu", ".relu()"}
    assert all(
        re.search(r"test_convert\.py:\d+ in Functional(Inner)?\.forward", s.where)
        for s in functional
    )
    table = str(plan)
    assert table.startswith("serfswap plan for Functional: 5 to convert")
    assert "F.gelu" in table and "inner" in table


def test_report_counts_and_skips() -> None:
    converted = serfswap.convert(Mixed())
    report = converted.serfswap_report
    assert report.counts() == {"nn.ReLU": 1}
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["tanh"].startswith("gate") and reasons["softmax"].startswith("gate")
    assert "not selected" in reasons["hs"]
    assert "learned parameters" in reasons["prelu"]
    assert "skip: has learned parameters" in str(report)


def test_activations_option_selects_families_and_classes() -> None:
    converted = serfswap.convert(Mixed(), activations=["hardswish", nn.PReLU])
    assert isinstance(converted.hs, serfswap.Serf) and isinstance(converted.prelu, serfswap.Serf)
    assert isinstance(converted.act, nn.ReLU)
    everything = serfswap.convert(Mixed(), activations="all")
    assert isinstance(everything.tanh, nn.Tanh) and isinstance(everything.softmax, nn.Softmax)
    with pytest.raises(serfswap.InvalidActivationsError, match="'sigmoid'"):
        serfswap.convert(Mixed(), activations=["sigmoid"])


def test_gated_mlp_is_converted_and_marked() -> None:
    converted = serfswap.convert(GatedMLP())
    (site,) = converted.serfswap_report.converted
    assert site.gated and "gated MLP" in str(converted.serfswap_report)


def test_include_exclude_and_filter() -> None:
    model = Nested()
    only = serfswap.convert(model, include="blocks.*")
    assert [s.name for s in only.serfswap_report.converted] == [
        "blocks.0.1",
        "blocks.1.1",
        "blocks.2.1",
    ]
    some = serfswap.convert(model, include=["blocks.*"], exclude="blocks.[0-1].*")
    assert [s.name for s in some.serfswap_report.converted] == ["blocks.2.1"]
    kept = serfswap.convert(model, filter_fn=lambda module, name: isinstance(module, nn.SiLU))
    assert [s.name for s in kept.serfswap_report.converted] == ["heads.a.1"]


def test_excluded_functional_module_inside_converted_one_keeps_its_calls() -> None:
    model = Functional()
    converted = serfswap.convert(model, exclude="inner")
    with count_activation_calls() as calls:
        converted(torch.randn(2, 8))
    assert calls.seen == {"gelu": 1, "relu": 1}  # inner's F.gelu and .relu(), and nothing else
    assert isinstance(vars(converted.inner)["forward"], FunctionalScope)
    assert vars(converted.inner)["forward"].families == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "nothing.*"}, r"include=\['nothing\.\*'\] matched none of the 5"),
        ({"exclude": "*"}, r"exclude=\['\*'\] excluded every activation"),
        ({"filter_fn": lambda m, n: False}, "filter_fn rejected every activation"),
        ({"activations": ["elu"]}, r"none of which is in activations=\['elu'\]"),
    ],
)
def test_nothing_matched_says_why(kwargs: dict, message: str) -> None:
    model = Nested()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(serfswap.NothingToConvertError, match=message) as info:
        serfswap.convert(model, inplace=True, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(model.stem[1], nn.ReLU), "a failed convert leaves the model untouched"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_activation_at_all() -> None:
    with pytest.raises(serfswap.NothingToConvertError, match="only 1 gates"):
        serfswap.convert(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))
    with pytest.raises(serfswap.NothingToConvertError, match="found no activation"):
        serfswap.convert(nn.Linear(2, 2))
    plan = serfswap.plan(nn.Linear(2, 2))  # the plan shows what would happen: nothing, and why
    assert plan.sites == [] and plan.notes[-1].startswith("nothing to convert: found no activ")


def test_bad_option_types_are_clear_errors() -> None:
    assert issubclass(serfswap.InvalidArgumentError, TypeError)
    with pytest.raises(serfswap.InvalidArgumentError, match="glob patterns"):
        serfswap.convert(Nested(), include=[1])
    with pytest.raises(serfswap.InvalidArgumentError, match="filter_fn must be callable"):
        serfswap.convert(Nested(), filter_fn="blocks")
    with pytest.raises(serfswap.InvalidArgumentError, match="include= takes a glob pattern"):
        serfswap.convert(Nested(), include=5)
    with pytest.raises(serfswap.InvalidActivationsError, match="activations= takes"):
        serfswap.convert(Nested(), activations=5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: serfswap.convert(None), r"convert\(\) takes a torch nn.Module, got NoneType"),
        (lambda: serfswap.convert("resnet18"), r"convert\(\) takes a torch nn.Module, got str"),
        (lambda: serfswap.plan(None), r"plan\(\) takes a torch nn.Module"),
        (lambda: serfswap.revert(None), r"revert\(\) takes a torch nn.Module"),
        (lambda: serfswap.export_onnx(None, "m.onnx"), r"export_onnx\(\) takes an nn.Module"),
    ],
)
def test_what_is_not_a_model_is_a_clear_error(call, message: str) -> None:
    with pytest.raises(serfswap.InvalidArgumentError, match=message):
        call()


def test_prelu_weight_keeps_its_key_and_moves_with_the_model() -> None:
    original = Mixed()
    with torch.no_grad():
        original.prelu.weight.fill_(0.3)
    converted = serfswap.convert(original, activations=["prelu", "relu", "hardswish"])
    state = converted.state_dict()
    assert "prelu.weight" in state
    Mixed().load_state_dict(state, strict=True)  # a strict load into the original works
    x = torch.randn(4, 8, dtype=torch.float64)
    doubled = converted.double()
    reverted = serfswap.revert(doubled)
    assert isinstance(reverted.prelu, nn.PReLU) and reverted.prelu.weight.dtype == torch.float64
    torch.testing.assert_close(reverted(x), original.double()(x), rtol=0, atol=0)


def test_converting_twice_is_a_no_op_and_one_revert_restores() -> None:
    model = Functional()
    x = torch.randn(2, 8)
    before = model(x)
    once = serfswap.convert(model)
    report = once.serfswap_report
    assert "already converted" in str(serfswap.plan(once))
    twice = serfswap.convert(once, inplace=True)
    assert twice is once and twice.serfswap_report is report
    torch.testing.assert_close(serfswap.revert(twice)(x), before, rtol=0, atol=0)


def test_transformer_layer_fast_path_is_disabled_while_converted() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    converted = serfswap.convert(layer)
    assert converted.activation_relu_or_gelu == 0
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), count_activation_calls() as calls:
        converted(x)
    assert calls.total == 0
    assert serfswap.revert(converted).activation_relu_or_gelu == 1


def test_functional_conversion_under_compile_and_export() -> None:
    torch._dynamo.reset()
    converted = serfswap.convert(Functional()).eval()
    x = torch.randn(2, 8)
    expected = converted(x)
    torch.testing.assert_close(torch.compile(converted, fullgraph=True)(x), expected)
    with serfswap.keep_custom_op():  # count the Serf calls as nodes of the op
        program = torch.export.export(converted, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.serfswap.serf.default) == 5
    assert not {torch.ops.aten.relu.default, torch.ops.aten.gelu.default} & set(targets)
    torch.testing.assert_close(program.module()(x), expected)


def test_converted_model_pickles_with_its_scopes(tmp_path) -> None:
    converted = serfswap.convert(Functional())
    path = tmp_path / "model.pt"
    torch.save(converted, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 8)
    with count_activation_calls() as calls:
        torch.testing.assert_close(loaded(x), converted(x))
    assert calls.total == 0
