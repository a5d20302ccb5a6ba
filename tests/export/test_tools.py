"""A converted model in the tools users already have, called the way they call them.

torch.onnx.export (the default dynamo exporter and ``dynamo=False``), torch.export (a ``.pt2``
that runs where serfswap cannot be imported) and torch.compile (inference and a training step).
The rule: if a call works on the original model, it works on the Serf model, with Serf as
standard ops.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

import serfswap
from serfswap.onnx_ops import check_graph, session
from serfswap.ops.serf import serf_composite
from tests.support.probes import CountSerfOps
from tests.zoo.hf_zoo import config

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

_STANDARD_DOMAINS = {"", "ai.onnx"}


class _KeywordCall(nn.Module):
    """What the TorchScript exporter needs for a transformers 5 model, original or Serf:
    ``torch.onnx.export(hf_model, ..., dynamo=False)`` fails on both with ``forward() got
    multiple values for argument 'use_cache'``; a wrapper that calls it by keyword works."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False
        )[0]


Inputs = dict[str, torch.Tensor]  # keyword inputs: GPT-2's second positional is its KV cache


def _timm(name: str) -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, {"x": torch.randn(2, *model.pretrained_cfg["input_size"])}


def _hf(model_type: str) -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config(model_type)).eval()
    ids = torch.randint(3, 99, (2, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS: dict[str, Callable[[], tuple[nn.Module, Inputs]]] = {
    "timm-resnet": lambda: _timm("test_resnet"),
    "timm-vit": lambda: _timm("test_vit"),
    "hf-bert": lambda: _hf("bert"),
    "hf-gpt2": lambda: _hf("gpt2"),
}


def _onnx_export(model: nn.Module, inputs: Inputs, path: Path, *, dynamo: bool) -> nn.Module:
    """The user's call, as it works on the original model; returns what was exported."""
    if isinstance(model, transformers.PreTrainedModel) and not dynamo:
        # In the model's mode: the exporter restores the wrapper's mode on all its children.
        model = _KeywordCall(model).train(model.training)
        torch.onnx.export(model, tuple(inputs.values()), str(path), input_names=list(inputs),
                          dynamo=False)  # fmt: skip
        return model
    torch.onnx.export(model, (), str(path), kwargs=inputs, input_names=list(inputs), dynamo=dynamo)
    return model


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _softplus_where_erf_mul(graph: onnx.GraphProto) -> int:
    """Serf as the dynamo exporter writes ATen softplus: Softplus, Greater, Where, Erf, Mul."""
    producer = {out: n for n in graph.node for out in n.output}
    count = 0
    for erf in (n for n in graph.node if n.op_type == "Erf"):
        where = producer.get(erf.input[0])
        if where is None or where.op_type != "Where":
            continue
        softplus = producer.get(where.input[2])
        if softplus is not None and softplus.op_type == "Softplus":
            x = where.input[1]  # softplus(x) = x above the threshold
            count += any(
                n.op_type == "Mul" and set(n.input) == {x, erf.output[0]} for n in graph.node
            )
    return count


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_torch_onnx_export_as_on_the_original(arch: str, dynamo: bool, tmp_path: Path) -> None:
    original, inputs = MODELS[arch]()
    if isinstance(original, transformers.PreTrainedModel):
        original.config.use_cache = False  # GPT-2's KV cache is no ONNX output
    converted = serfswap.convert(original).eval()
    with torch.no_grad(), CountSerfOps() as counter:
        converted(**inputs)
    assert counter.calls > 0
    for name, model in (("original", original), ("serf", converted)):
        path = tmp_path / f"{name}.onnx"
        exported = _onnx_export(model, inputs, path, dynamo=dynamo)
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        graph = check_graph(proto, str(tmp_path))
        assert graph.custom_domains == [] and not proto.functions
        assert {n.domain for n in proto.graph.node} <= _STANDARD_DOMAINS
        sess = session(path, "cpu")
        # The TorchScript exporter drops an all-ones attention mask that the model never reads.
        got = sess.run(None, {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})
        with torch.no_grad():
            want = _leaves(exported(**inputs))
        assert len(got) == len(want)
        for ort_out, torch_out in zip(got, want, strict=True):
            torch.testing.assert_close(torch.from_numpy(ort_out), torch_out, atol=1e-4, rtol=1e-4)
        if name == "serf":
            ops = Counter(n.op_type for n in proto.graph.node)
            assert ops["Softplus"] == counter.calls
            if dynamo:
                assert _softplus_where_erf_mul(proto.graph) == counter.calls
                # check_graph knows serfswap's exact patterns, not this one, so it lists the
                # parts; no original activation (Relu, Gelu, ...) is left besides.
                assert set(graph.leftovers) == {
                    "Softplus outside a Serf pattern",
                    "Erf outside a Serf pattern",
                }
            else:
                assert graph.serf == {"softplus": counter.calls}  # exactly Softplus, Erf, Mul
                assert not graph.leftovers, graph.leftovers


@pytest.mark.parametrize("arch", ["hf-bert", "hf-gpt2"])
def test_plain_torchscript_export_of_hf_fails_the_same_on_both(arch: str, tmp_path: Path) -> None:
    """transformers 5 models cannot go through ``torch.onnx.export(model, (ids,), dynamo=False)``
    at all; the Serf model fails in exactly the same way, not in a way of its own."""
    original, inputs = MODELS[arch]()
    messages = []
    for model in (original, serfswap.convert(original).eval()):
        with pytest.raises(TypeError) as info:
            torch.onnx.export(model, (inputs["input_ids"],), str(tmp_path / "m.onnx"), dynamo=False)
        messages.append(str(info.value))
    assert "multiple values for argument 'use_cache'" in messages[0]
    assert messages[0] == messages[1]


# torch.export ------------------------------------------------------------------------------------

_LOAD_WITHOUT_SERFSWAP = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoSerfswap(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "serfswap" or name.startswith("serfswap."):
                raise ImportError(f"{name} is blocked: this process has no serfswap")

    sys.meta_path.insert(0, NoSerfswap())
    for name in sys.argv[4:]:  # what the program's output types need, e.g. transformers
        __import__(name)
    sys.modules.pop("serfswap", None)
    try:
        import serfswap
    except ImportError:
        pass
    else:
        raise SystemExit("serfswap imported: the block does not work")

    import torch

    program_path, inputs_path, out_path = sys.argv[1:4]
    program = torch.export.load(program_path)
    inputs = torch.load(inputs_path)
    torch.save(program.module()(**inputs), out_path)
    assert not any(m.startswith("serfswap") for m in sys.modules), "serfswap got imported"
    """
)


def _run_without_serfswap(
    program: torch.export.ExportedProgram, inputs: Inputs, tmp_path: Path, imports: list[str]
) -> subprocess.CompletedProcess[str]:
    program_path, inputs_path = tmp_path / "model.pt2", tmp_path / "inputs.pt"
    torch.export.save(program, program_path)
    torch.save(inputs, inputs_path)
    return subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_SERFSWAP, str(program_path), str(inputs_path),
         str(tmp_path / "out.pt"), *imports],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["timm-resnet", "hf-bert"])
def test_torch_export_program_runs_where_serfswap_is_not_importable(
    arch: str, tmp_path: Path
) -> None:
    original, inputs = MODELS[arch]()
    converted = serfswap.convert(original).eval()
    program = torch.export.export(converted, (), inputs)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if t.startswith("serfswap")}
    # transformers' output classes are pytree nodes of the program's output: a box serving a
    # transformers model has transformers; it need not have serfswap.
    imports = ["transformers.modeling_outputs"] if arch.startswith("hf") else []
    result = _run_without_serfswap(program, inputs, tmp_path, imports)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    with torch.no_grad():
        in_process = program.module()(**inputs)
        eager = converted(**inputs)
    for a, b, c in zip(_leaves(got), _leaves(in_process), _leaves(eager), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same program, the same numbers
        torch.testing.assert_close(a, c)  # ATen Serf vs the eager op: float32 rounding only


def test_a_program_that_keeps_the_op_needs_serfswap(tmp_path: Path) -> None:
    """The control for the test above: the subprocess really has no serfswap."""
    model = nn.Sequential(nn.Linear(4, 4), serfswap.Serf()).eval()
    x = torch.randn(2, 4)
    with serfswap.keep_custom_op():
        program = torch.export.export(model, (x,))
    result = _run_without_serfswap(program, {"input": x}, tmp_path, [])
    assert result.returncode != 0
    assert "serfswap" in result.stderr


# torch.compile -----------------------------------------------------------------------------------


def _train_step(model: nn.Module, inputs: Inputs) -> tuple[Any, list[torch.Tensor]]:
    model.zero_grad()
    out = _leaves(model(**inputs))
    sum(o.float().square().mean() for o in out).backward()  # type: ignore[union-attr]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return [o.detach() for o in out], grads


@pytest.mark.parametrize(
    ("arch", "fullgraph"), [("timm-resnet", True), ("hf-bert", False)], ids=["fullgraph", "default"]
)
def test_torch_compile_inference_and_training_match_eager(arch: str, fullgraph: bool) -> None:
    torch._dynamo.reset()
    original, inputs = MODELS[arch]()
    eager = serfswap.convert(original).train()
    for m in eager.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same numbers in both, not the same random masks
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=fullgraph)
    for _ in range(2):  # the second step starts from the weights the first one updated
        want_out, want_grads = _train_step(eager, inputs)
        got_out, got_grads = _train_step(compiled, inputs)
        assert len(got_grads) == len(want_grads) > 0
        for got, want in zip([*got_out, *got_grads], [*want_out, *want_grads], strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        for got, want in zip(_leaves(compiled(**inputs)), _leaves(eager(**inputs)), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compiled_serf_matches_the_op_in_the_tail_and_keeps_its_memory() -> None:
    """Under inductor Serf is fused ATen ops, with the op's tail formula (x < -87 in float32,
    where the plain formula loses precision) and the op's memory: only x saved for backward."""
    torch._dynamo.reset()
    x = torch.cat([torch.linspace(-95, 30, 4001), torch.tensor([-1e4, -88.0, 0.0, 1e30])])
    compiled = torch.compile(serfswap.serf, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = serfswap.serf(xe), compiled(xc)
    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-30)

    def saved_bytes(model: nn.Module, inp: torch.Tensor) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inp)
        out.sum().backward()
        return total

    class Composite(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return serf_composite(t)

    def net(act: type[nn.Module]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), act(), nn.Linear(256, 256), act())

    inp = torch.randn(32, 64)
    eager_bytes = saved_bytes(net(serfswap.Serf), inp)
    compiled_bytes = saved_bytes(torch.compile(net(serfswap.Serf), fullgraph=True), inp)
    composite_bytes = saved_bytes(net(Composite), inp)  # the control: the hook sees the 3 tensors
    assert compiled_bytes <= eager_bytes < composite_bytes


def test_torch_func_inside_torch_compile() -> None:
    """Inside a compiled function Serf is ATen ops, so torch.func's transforms apply to it (the
    op's registered autograd is rejected there, pytorch/pytorch#168393)."""
    torch._dynamo.reset()
    x = torch.randn(7)

    def grad_of_sum(t: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda y: serfswap.serf(y).sum())(t)

    compiled = torch.compile(grad_of_sum, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), grad_of_sum(x))
    batched = torch.compile(torch.func.vmap(serfswap.serf), backend="aot_eager", fullgraph=True)
    xs = torch.randn(3, 5)
    torch.testing.assert_close(batched(xs), serfswap.serf(xs))
