"""Gradients of serfswap.serf: analytic backward, higher derivatives, memory, torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import serfswap
from serfswap.ops.blocks import SERIAL_BLOCK, THREADED_BLOCK
from serfswap.ops.formula import grad_times_blocked, grad_times_whole
from serfswap.ops.serf import serf_composite


def sweep32() -> torch.Tensor:
    dense = torch.linspace(-100, 100, 200_001)
    info = torch.finfo(torch.float32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1e4,
            -1e4,
            info.max,
            -info.max,
            info.tiny,
            -info.tiny,
            1e-40,
            -1e-40,
            20.0,
            -20.0,
            -87.5,
            -91.0,
        ]
    )
    return torch.cat([dense, special])


def grad_of(fn, x: torch.Tensor, *, expanded: bool = False) -> torch.Tensor:
    """d sum(fn(x)) / dx. The upstream gradient is a dense tensor of ones (the CPU backward then
    runs blocked), or with ``expanded`` the stride-0 one that ``.sum().backward()`` makes (the
    CPU backward then runs on whole tensors)."""
    x = x.detach().requires_grad_()
    y = fn(x)
    ones = torch.ones((), dtype=y.dtype).expand_as(y) if expanded else torch.ones_like(y)
    (g,) = torch.autograd.grad(y, x, grad_outputs=ones)
    return g


# gradcheck's batched-grad check calls the deprecated torch.jit.script internally.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_gradcheck_and_gradgradcheck_float64() -> None:
    x = torch.cat(
        [
            torch.randn(40, dtype=torch.float64) * 4,
            torch.tensor([0.0, -30.0, 25.0, 1e-3], dtype=torch.float64),
        ]
    )
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        serfswap.serf, (x,), check_forward_ad=True, check_batched_grad=True
    )
    assert torch.autograd.gradgradcheck(
        serfswap.serf, (x,), check_fwd_over_rev=True, check_batched_grad=True
    )


def test_backward_op_gradcheck_float64() -> None:
    """serfswap::serf_backward has its own derivatives (double backward, forward mode)."""
    g = torch.randn(20, dtype=torch.float64, requires_grad=True)
    x = (torch.randn(20, dtype=torch.float64) * 3).requires_grad_()
    op = torch.ops.serfswap.serf_backward
    assert torch.autograd.gradcheck(op, (g, x))
    assert torch.autograd.gradgradcheck(op, (g, x))


@pytest.mark.parametrize("expanded", [False, True], ids=["blocked", "whole"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_gradient_agrees_with_autograd_of_composite(
    dtype: torch.dtype, tol: float, expanded: bool
) -> None:
    x = sweep32().to(dtype)
    ours = grad_of(serfswap.serf, x, expanded=expanded)
    theirs = grad_of(serf_composite, x)
    finite = torch.isfinite(theirs)  # the composite's own gradient is NaN at x = -float32 max
    assert finite.sum() >= x.numel() - 1
    diff = ((ours - theirs).abs() / theirs.abs().clamp(min=1))[finite]
    assert diff.max().item() <= tol, f"worst at x={x[diff.argmax()].item()}"


@pytest.mark.parametrize("expanded", [False, True], ids=["blocked", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gradient_finite_wherever_forward_is_finite(dtype: torch.dtype, expanded: bool) -> None:
    x = sweep32().to(dtype)
    y = serfswap.serf(x)
    g = grad_of(serfswap.serf, x, expanded=expanded)
    assert g.dtype == dtype
    assert torch.isfinite(g[torch.isfinite(y)]).all()


def test_second_derivative_matches_composite() -> None:
    x = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    hess = torch.func.vmap(torch.func.hessian(lambda v: serfswap.serf(v)))(x)
    ref = torch.func.vmap(torch.func.hessian(lambda v: serf_composite(v)))(x)
    torch.testing.assert_close(hess, ref, rtol=1e-10, atol=1e-12)


def saved_bytes(fn, x: torch.Tensor) -> list[int]:
    """Sizes of the distinct tensors autograd keeps for backward while running ``fn(x)``.

    A tensor saved by two ops (the composite saves ``x`` for both softplus and the product)
    is counted once: it is one allocation.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return list(seen.values())


def test_keeps_exactly_the_input_for_backward() -> None:
    x = torch.randn(8, 16, 32, requires_grad=True)
    nbytes = x.numel() * 4
    assert saved_bytes(serfswap.serf, x) == [nbytes]
    assert saved_bytes(serfswap.Serf(), x) == saved_bytes(nn.GELU(), x) == [nbytes]
    assert saved_bytes(serf_composite, x) == [nbytes] * 3


def test_half_input_keeps_only_the_half_tensor() -> None:
    """The fp16 path keeps the fp16 input, not a float32 copy."""
    x = torch.randn(64, dtype=torch.float16, requires_grad=True)
    assert saved_bytes(serfswap.serf, x) == [64 * 2]


def test_torch_func_transforms() -> None:
    x = torch.randn(4, 5)
    g = torch.func.grad(lambda v: serfswap.serf(v).sum())(x)
    torch.testing.assert_close(g, grad_of(serf_composite, x))
    torch.testing.assert_close(torch.func.vmap(serfswap.serf)(x), serfswap.serf(x))
    torch.testing.assert_close(torch.func.vmap(serfswap.serf, in_dims=1)(x), serfswap.serf(x.t()))
    per_row = torch.func.vmap(torch.func.grad(lambda v: serfswap.serf(v).sum()))(x)
    torch.testing.assert_close(per_row, g)
    jac = torch.func.jacfwd(serfswap.serf)(x[0])
    torch.testing.assert_close(jac, torch.diag(g[0]))
    torch.testing.assert_close(torch.func.jacrev(serfswap.serf)(x[0]), jac)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4), (), (0,), (2, 3, 5)])
# opcheck's own fake-tensor copy reads .grad of non-leaf inputs; the warning is torch's, not ours.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_opcheck(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.serfswap.serf.default, (x,))
    g = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.serfswap.serf_backward.default, (g, x))


def test_opcheck_non_contiguous() -> None:
    x = torch.randn(6, 8)[:, ::2].requires_grad_()
    torch.library.opcheck(torch.ops.serfswap.serf.default, (x,))
    g = torch.randn(4, 6).t()
    torch.library.opcheck(torch.ops.serfswap.serf_backward.default, (g, x))


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "permuted": lambda t: t.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0),
}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest):
    """ATen's thread count for the test: 1 (big blocks, inline) or 2 (small blocks, a pool)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_blocked_backward_matches_whole_tensor_backward(
    layout: str, dtype: torch.dtype, threads: int
) -> None:
    """Several blocks and a partial last one, in any dense layout, with half-type upcasts."""
    shape = (3, 7, 128, 100)  # 268,800 elements: 1 or 8 full blocks and a partial one
    assert SERIAL_BLOCK < 3 * 7 * 128 * 100 < 2 * SERIAL_BLOCK
    assert 8 * THREADED_BLOCK < 3 * 7 * 128 * 100 < 9 * THREADED_BLOCK
    x = LAYOUTS[layout](torch.randn(shape, dtype=torch.float64).mul(8).to(dtype))
    g = LAYOUTS[layout](torch.randn(shape, dtype=dtype))
    blocked = grad_times_blocked(g, x)
    assert blocked is not None and blocked.stride() == x.stride()
    whole = grad_times_whole(g, x)
    rtol = {torch.float32: 5e-7, torch.float64: 1e-15}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(blocked, whole, rtol=rtol, atol=1e-30)


def test_blocked_backward_declines_mismatched_layouts() -> None:
    x = torch.randn(4, 6)
    assert grad_times_blocked(torch.randn(6, 4).t(), x) is None  # strides differ
    assert grad_times_blocked(torch.randn(8, 12)[::2, ::2], torch.randn(8, 12)[::2, ::2]) is None
