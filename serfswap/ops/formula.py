"""Serf's formulas, as the op computes them: the eager forward, the analytic backward (blocked
over cache-sized pieces on CPU), the second derivative, and the guards that keep them accurate
(the negative tail, the erf series for inductor).

:mod:`serfswap.ops.serf` builds the op, its autograd and the module on these; see its docstring
for why the op exists and what each guard measured. Nothing here dispatches or traces.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import run_blocks

TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)  # erf'(s) = 2/sqrt(pi) * exp(-s^2)

# Below these x, exp(x) is near or inside the subnormal range, where it loses relative precision,
# while Serf(x) is still normal. There softplus(x) = exp(x) and erf(s) = 2/sqrt(pi) * s hold to
# full precision, so Serf(x) = (x * 2/sqrt(pi) * exp(x/2)) * exp(x/2), every factor normal.
TAIL_START = {torch.float32: -80.0, torch.float64: -700.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32 so that the result is rounded once."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _upcast(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype))


def tail(x: Tensor) -> Tensor:
    half_exp = torch.exp(x * 0.5)
    # x * exp(x/2) first: it stays finite even for x = -float32 max, where x * 2/sqrt(pi) is -inf.
    return x * half_exp * TWO_OVER_SQRT_PI * half_exp


def fix_negative_tail(x: Tensor, out: Tensor, *, sync_free: bool | None = None) -> None:
    """Overwrite ``out`` with the tail formula where ``x`` is below the tail start."""
    if x.numel() == 0:
        return
    start = TAIL_START[x.dtype]
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    if sync_free:
        # On an accelerator a host-side test would stall the stream: select without branching.
        torch.where(x < start, tail(x), out, out=out)
        return
    # On CPU one read-only reduction is cheaper than a masked pass; activations rarely reach the
    # tail. `not (min >= start)` is also true when x holds a NaN, whose min is NaN.
    if not bool(x.amin() >= start):
        mask = x < start
        out[mask] = tail(x[mask])


def serf_forward(x: Tensor) -> Tensor:
    """``Serf(x)`` in whole-tensor passes: four ATen ops, so four parallel regions at most.

    Not blocked like the backward: its passes are few and compute-bound (softplus, erf), and
    blocking it over threads (serfswap.ops.blocks) measured no faster, quiet or shared.
    """
    xc = _upcast(x)
    out = F.softplus(xc)  # log1p(exp(x)), and x itself above 20: no overflow
    out.erf_().mul_(xc)
    fix_negative_tail(xc, out)
    return out.to(x.dtype)


def _grad_kernel(grad: Tensor, x: Tensor, out: Tensor, sp: Tensor, gate: Tensor) -> None:
    """``out = grad * Serf'(x)``, ``Serf'(x) = erf(sp) + x sigmoid(x) 2/sqrt(pi) exp(-sp^2)``.

    All five tensors share one shape and the compute dtype; ``sp`` and ``gate`` are scratch.
    ``sigmoid(x) * exp(-sp^2)`` is computed as ``exp(x - sp - sp^2)`` (``log sigmoid(x) = x - sp``):
    one exponential, no division, finite for every finite x.
    """
    # F.softplus is the ATen builtin and takes out=; half the call's cost of torch.ops.aten's
    # overload, which counts in the threaded backward's 32K-element blocks.
    F.softplus(x, 1, 20, out=sp)
    torch.erf(sp, out=out)
    sp.addcmul_(sp, sp)  # sp + sp^2
    torch.sub(x, sp, out=gate).exp_()  # sigmoid(x) * exp(-sp^2)
    # addcmul computes value * gate * x left to right: gate first, so that a zero gate wins
    # over |x * 2/sqrt(pi)| overflowing (x = +-float32 max).
    out.addcmul_(gate, x, value=TWO_OVER_SQRT_PI).mul_(grad)


def _flat_in_memory_order(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t`` in storage order if ``t`` is dense (any dim order), else None."""
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def grad_times_blocked(grad: Tensor, x: Tensor) -> Tensor | None:
    """The CPU backward over blocks (serfswap.ops.blocks); None when the layouts do not allow it.

    Seven passes per block whose working set stays in cache, instead of streaming whole tensors
    through memory seven times: 1.7x faster than whole-tensor passes on a 64x256x56x56 input.
    """
    if grad.stride() != x.stride():
        return None
    # Detached: pool threads run these ops outside the op's below-autograd dispatch state.
    x_flat, grad_flat = _flat_in_memory_order(x.detach()), _flat_in_memory_order(grad.detach())
    if x_flat is None or grad_flat is None:
        return None
    out = torch.empty_like(x, dtype=grad.dtype)  # same strides as x, so same memory order
    out_flat = _flat_in_memory_order(out)
    assert out_flat is not None  # empty_like keeps a dense layout
    compute = compute_dtype(x.dtype)
    direct = x.dtype == grad.dtype == compute  # else blocks are upcast into scratch rows

    def make_kernel(block: int) -> Callable[[int, int], None]:
        scratch = torch.empty((2 if direct else 5, block), dtype=compute)
        full_rows = scratch.unbind()  # sliced once: Python calls count in small blocks

        def kernel(begin: int, end: int) -> None:
            sp, gate, *io = full_rows if end - begin == block else scratch[:, : end - begin]
            if direct:
                _grad_kernel(grad_flat[begin:end], x_flat[begin:end], out_flat[begin:end], sp, gate)
                return
            x_blk, grad_blk, out_blk = io
            x_blk.copy_(x_flat[begin:end])
            grad_blk.copy_(grad_flat[begin:end])
            _grad_kernel(grad_blk, x_blk, out_blk, sp, gate)
            out_flat[begin:end].copy_(out_blk)

        return kernel

    run_blocks(x_flat.numel(), make_kernel)
    return out


def grad_times_whole(grad: Tensor, x: Tensor) -> Tensor:
    """The backward in whole-tensor passes: for accelerators and irregular layouts."""
    xc, gc = _upcast(x), _upcast(grad)
    out, sp, gate = torch.empty_like(xc), torch.empty_like(xc), torch.empty_like(xc)
    _grad_kernel(gc, xc, out, sp, gate)
    return out.to(grad.dtype)


def grad_times(grad: Tensor, x: Tensor) -> Tensor:
    """``grad * Serf'(x)``: blocked on CPU when the layouts allow, whole tensors otherwise."""
    if x.device.type == "cpu" and x.numel() > 0:
        out = grad_times_blocked(grad, x)
        if out is not None:
            return out
    return grad_times_whole(grad, x)


def second_derivative(x: Tensor) -> Tensor:
    """``Serf''(x) = 2/sqrt(pi) exp(-sp^2) sigmoid(x) (2 + x (sigmoid(-x) - 2 sp sigmoid(x)))``.

    Written with differentiable ops only, so third and higher derivatives follow from autograd.
    """
    xc = _upcast(x)
    sp = F.softplus(xc)
    sig = torch.sigmoid(xc)
    inner = 2 + xc * (torch.sigmoid(-xc) - 2 * sp * sig)
    return TWO_OVER_SQRT_PI * torch.exp(-sp * sp) * sig * inner


# erf(s) = 2/sqrt(pi) * sum_n (-1)^n s^(2n+1) / (n! (2n+1)): the terms up to n = 6, whose
# remainder is below 3e-8 relative for s < 0.5.
_ERF_SERIES = tuple(
    TWO_OVER_SQRT_PI * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(7)
)
_ERF_SERIES_END = 0.5


def erf_nonnegative(s: Tensor) -> Tensor:
    """erf(s) for s >= 0, accurate relative to erf(s) for small s.

    Inductor's vectorised CPU erf has an absolute error near 1e-7 (measured, torch 2.14): for
    s = 1e-6 it is 17% off, and below 1e-7 it returns 0. Serf's erf argument, softplus(x), is that
    small for every x < -14, so under torch.compile the plain formula would lose the negative
    tail entirely. The series costs a few fused multiply-adds.
    """
    # Clamped, so that the unselected series of a large s has a finite gradient (0 * inf = NaN).
    small = s.clamp(max=_ERF_SERIES_END)
    s2 = small * small
    # Horner from a scalar, not from a full_like tensor: with one, inductor's partitioner saves
    # an extra tensor per call for backward (measured), and the memory of the op would be lost.
    series = s2 * _ERF_SERIES[-1] + _ERF_SERIES[-2]
    for coefficient in reversed(_ERF_SERIES[:-2]):
        series = series * s2 + coefficient
    return torch.where(s < _ERF_SERIES_END, series * small, torch.erf(s))
