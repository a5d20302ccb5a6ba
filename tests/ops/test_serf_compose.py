"""serfswap.serf inside the PyTorch stack: compile, export, autocast, DDP, modules, CUDA."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import serfswap
from tests.support.reference import requires_cuda, serf_reference


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), serfswap.Serf(), nn.Linear(32, 8), serfswap.Serf())


def grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_torch_compile_fullgraph_inductor() -> None:
    """No graph break (fullgraph=True raises on one); values and gradients match eager."""
    torch._dynamo.reset()
    model = small_net()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), model(x))
    for got, want in zip(grads(compiled, x), grads(model, x), strict=True):
        torch.testing.assert_close(got, want)


def _serfswap_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("serfswap.")]


def _dynamo_graph(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    torch._dynamo.reset()
    seen: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        seen.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm,) = seen
    return gm


def test_torch_compile_sees_aten_ops_so_inductor_can_fuse() -> None:
    gm = _dynamo_graph(small_net(), torch.randn(2, 16))
    assert _serfswap_ops(gm) == []
    assert sum(n.target is torch.erf for n in gm.graph.nodes) == 2


def test_keep_custom_op_keeps_one_serf_node_per_call() -> None:
    with serfswap.keep_custom_op():
        gm = _dynamo_graph(small_net(), torch.randn(2, 16))
    assert _serfswap_ops(gm) == ["serfswap.serf.default"] * 2


def test_torch_export_roundtrip() -> None:
    """A program holds only ATen ops (it runs without serfswap) and keeps dynamic shapes."""
    model = small_net().eval()
    x = torch.randn(3, 16)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert _serfswap_ops(program.graph_module) == []
    assert targets.count(torch.ops.aten.erf.default) == 2
    x5 = torch.randn(5, 16)
    torch.testing.assert_close(program.module()(x5), model(x5))


def test_torch_export_keeps_the_op_when_asked() -> None:
    with serfswap.keep_custom_op():
        program = torch.export.export(small_net().eval(), (torch.randn(3, 16),))
    assert _serfswap_ops(program.graph_module) == ["serfswap.serf.default"] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype: torch.dtype) -> None:
    model = small_net()
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        hidden = model[0](x)
        y = model[1](hidden)
    assert hidden.dtype == y.dtype == dtype
    torch.testing.assert_close(
        y.double(), serf_reference(hidden), rtol=torch.finfo(dtype).eps, atol=0
    )
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ddp_single_process_gloo(tmp_path: Path) -> None:
    """Serf inside DistributedDataParallel: same gradients as the plain module."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = small_net()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        x = torch.randn(8, 16)
        for got, want in zip(grads(ddp, x), grads(model, x), strict=True):
            torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()


def test_module_matches_function_and_is_picklable(tmp_path: Path) -> None:
    model = small_net()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    clone = small_net()
    clone.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 16)
    torch.testing.assert_close(clone(x), model(x))
    torch.testing.assert_close(serfswap.Serf()(x), serfswap.serf(x))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    x = torch.cat([torch.linspace(-100, 100, 200_001), torch.tensor([-91.0, 1e4, -1e4])])
    x = x.to(dtype)
    xc = x.cuda().requires_grad_()
    y = serfswap.serf(xc)
    y.sum().backward()
    xr = x.clone().requires_grad_()
    serfswap.serf(xr).sum().backward()
    tol = {torch.float32: 5e-7, torch.float64: 1e-15}.get(dtype, torch.finfo(dtype).eps)
    # atol: one float32 subnormal step. Below x = -98 the result is subnormal, and the CUDA
    # kernel (Triton) and the CPU op, each within half a step of float64 there, differ by one.
    atol = 2.0**-149 if dtype == torch.float32 else 0
    torch.testing.assert_close(y.cpu(), serfswap.serf(x), rtol=tol, atol=atol)
    torch.testing.assert_close(xc.grad.cpu(), xr.grad, rtol=max(tol, 1e-6), atol=1e-7)


def test_timm_act_layer_builds_a_serf_model() -> None:
    """The README's quickstart: timm passes act_layer through and calls it with inplace=True."""
    timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, act_layer=serfswap.Serf)
    acts = [m for m in model.modules() if isinstance(m, serfswap.Serf)]
    assert acts and all(m.inplace for m in acts)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
