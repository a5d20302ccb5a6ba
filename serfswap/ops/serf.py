"""The Serf activation: ``Serf(x) = x * erf(softplus(x))`` (Nag & Bhattacharyya, arXiv 2108.09598).

Two forms of one function, chosen per call:

* **Eager**: the custom op ``serfswap::serf`` inside an autograd Function.
* **Traced** (``torch.compile``, ``torch.export``, ``torch.jit.trace``, both ONNX exporters): plain
  ATen ops, so that a traced Serf model needs no serfswap where it runs and inductor can fuse Serf
  with its neighbours. serfswap's own exporter asks for the op instead (:func:`keep_custom_op`)
  and maps it to an exact ONNX pattern.

Why a custom op in eager mode and not the three-line composite:

* Memory. Autograd of ``x * erf(softplus(x))`` keeps three tensors per call (x, softplus(x),
  erf(...)). ``serfswap::serf`` keeps only its input, as ``nn.GELU`` does, and recomputes the rest
  in an analytic backward: a third of the composite's activation memory in training.
* Speed. The forward runs in place on one buffer; the backward makes seven passes, with no
  ``f(x)/x`` form, over cache-sized blocks on CPU that threads take from a shared counter, so
  that a CPU shared with other busy processes does not stall it (:mod:`serfswap.ops.blocks`).
  Both are about the time of ``F.mish`` (benchmarks/RESULTS.md).
* Accuracy. Where ``exp(x)`` inside softplus would be subnormal (x < -87.3 in float32) while the
  result is still a normal number (down to x = -91.9), the composite loses up to 2e-5 relative;
  the op switches to a tail formula there and stays within a few float32 ulps everywhere.

Why ATen ops when traced, and why chosen by a branch in :func:`serf` (measured, torch 2.14):

* A tracer that meets the op must know it: the dynamo ONNX exporter fails on it without a
  ``custom_translation_table``, the TorchScript exporter fails on the autograd Function
  (``Couldn't export Python operator``), a ``torch.export`` program holds ``serfswap::serf`` and
  cannot run without serfswap, and inductor cannot fuse an opaque node.
* Alternatives considered, not built: a CompositeImplicitAutograd kernel or a ``torch.library``
  decomposition would replace the op in eager mode too (losing its memory), or only in the one
  pipeline that applies the decomposition table (``run_decompositions``, inductor), not in the
  user's own ``torch.export``/ONNX call; ``register_custom_op_symbolic`` and
  ``Function.symbolic`` reach only the TorchScript exporter (and the dynamo exporter ignores
  ``symbolic``, DESIGN.md). The branch covers every tracer with two public flags, measured:
  ``torch.compiler.is_compiling()`` is true under dynamo, ``torch.compile``, ``torch.export``
  (strict and non-strict) and the dynamo ONNX exporter; ``torch.jit.is_tracing()`` under
  ``torch.jit.trace`` and ``torch.onnx.export(dynamo=False)``.
* Memory is not lost under ``torch.compile``: inductor's partitioner recomputes the elementwise
  chain in the backward, so the compiled composite saves only ``x`` (a 2-layer MLP: 152 MiB saved
  for backward, as eager Serf; the eager composite saves 344 MiB), with a lower peak than eager.
* Accuracy under inductor needs two guards. Its vectorised CPU ``erf`` has an absolute error
  near 1e-7, so erf(softplus(x)) is 17% off at x = -14 and 0 below x = -16: a short series
  replaces it below 0.5 (:func:`~serfswap.ops.formula.erf_nonnegative`). And the op's tail
  formula is kept. Both fuse (+3% of a training step in that MLP); compiled Serf is within
  1.3e-6 relative of float64 on [-95, 30], as the eager op is. Both are left out under the ONNX
  exporters, whose graphs run in onnxruntime (its Erf is accurate): it fuses nothing for Serf,
  and the tail's eight extra nodes cost +45% to +70% of Serf's time there. The graph then
  matches serfswap's own ``softplus`` pattern (``dynamo=False``: Softplus, Erf, Mul; dynamo:
  Softplus, Greater, Where, Erf, Mul, the Where being softplus's threshold of 20, exact either
  way).

Special values: NaN gives NaN, +inf gives +inf, ``-inf`` gives **NaN** (``-inf * erf(0)``), as in
IEEE arithmetic and as in the exported ONNX graph, which stays three standard nodes; the limit
would be 0, but a model that feeds ``-inf`` to an activation is already broken and NaN says so.
float16 and bfloat16 are computed in float32 and rounded once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedDtypeError
from .formula import (
    TAIL_START,
    compute_dtype,
    erf_nonnegative,
    grad_times,
    second_derivative,
    serf_forward,
    tail,
)

__all__ = ["Serf", "keep_custom_op", "serf", "serf_composite"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@torch.library.custom_op("serfswap::serf", mutates_args=())
def _serf_op(x: Tensor) -> Tensor:
    return serf_forward(x)


@_serf_op.register_fake
def _serf_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("serfswap::serf_backward", mutates_args=())
def _serf_backward_op(grad: Tensor, x: Tensor) -> Tensor:
    return grad_times(grad, x)


@_serf_backward_op.register_fake
def _serf_backward_fake(grad: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x, dtype=grad.dtype)


# The CUDA kernels of both ops: one fused Triton pass each (serfswap/ops/triton_kernels.py) instead
# of the ATen passes of serfswap/ops/formula.py (forward: softplus, erf_, mul_ and the branch-free
# tail, about eight kernels; backward: seven passes plus casts).
#
# Registered with ``register_kernel("cuda")`` on the existing ops, not as a
# ``torch.library.triton_op``: the ops' schema, fake, autograd and vmap rules and CPU kernels stay
# as they are, so CPU callers, torch.export programs and serfswap's ONNX mapping see the same op;
# triton is imported on the first CUDA call only, so `import serfswap` works without it (the
# compat job's CPU torch). What triton_op adds, inductor tracing into the kernel, buys nothing
# here: under torch.compile serf() is ATen ops that inductor fuses itself (see _is_traced), and
# with keep_custom_op() the op is an extern call that runs this kernel, as torch.export's
# programs do. float64 and tensors triton cannot take keep the ATen path.


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """serfswap.triton_kernels, or None where triton is not installed (e.g. Windows wheels)."""
    try:
        return importlib.import_module(".triton_kernels", __package__)
    except ImportError:
        return None


@_serf_op.register_kernel("cuda")
def _serf_cuda(x: Tensor) -> Tensor:
    kernels = _triton_kernels()
    if kernels is None or x.dtype not in kernels.KERNEL_DTYPES:
        return serf_forward(x)
    return kernels.serf_forward(x)


@_serf_backward_op.register_kernel("cuda")
def _serf_backward_cuda(grad: Tensor, x: Tensor) -> Tensor:
    kernels = _triton_kernels()
    dtypes = () if kernels is None else kernels.KERNEL_DTYPES
    if x.dtype not in dtypes or grad.dtype not in dtypes or grad.shape != x.shape:
        return grad_times(grad, x)
    return kernels.serf_backward(grad, x)


def _batch_first(t: Tensor, dim: int | None, size: int) -> Tensor:
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


class _SerfAutograd(torch.autograd.Function):
    """Autograd of ``serfswap::serf``: saves only ``x``, backward is ``serfswap::serf_backward``.

    The same rules are registered on the op itself (for ``torch.ops.serfswap.serf`` and for
    exported programs); this Function wraps them because torch.func (grad, jacrev, hessian)
    rejects the autograd that ``register_autograd`` generates (pytorch/pytorch#168393).
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _serf_op(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)  # the only tensor kept for backward
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _SerfBackwardFunction.apply(grad, x)

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _SerfBackwardFunction.apply(x_tangent, x)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
        return _SerfAutograd.apply(x), in_dims[0]  # elementwise: the batch dim stays put


class _SerfBackwardFunction(torch.autograd.Function):
    """``grad * Serf'(x)`` with its own derivatives, for double backward and forward-mode AD."""

    @staticmethod
    def forward(grad: Tensor, x: Tensor) -> Tensor:
        return _serf_backward_op(grad, x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad, x = ctx.saved_tensors
        d_grad = _SerfBackwardFunction.apply(grad_grad, x) if ctx.needs_input_grad[0] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            d_x = (grad_grad * grad * second_derivative(x)).to(x.dtype)
        return d_grad, d_x

    @staticmethod
    def jvp(ctx: Any, grad_tangent: Tensor | None, x_tangent: Tensor | None) -> Tensor:
        grad, x = ctx.saved_tensors
        out = torch.zeros_like(grad)
        if grad_tangent is not None:
            out = out + _SerfBackwardFunction.apply(grad_tangent, x)
        if x_tangent is not None:
            out = out + (grad * second_derivative(x) * x_tangent).to(grad.dtype)
        return out

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], grad: Tensor, x: Tensor
    ) -> tuple[Tensor, int]:
        grad_dim, x_dim = in_dims
        grad = _batch_first(grad, grad_dim, info.batch_size)
        x = _batch_first(x, x_dim, info.batch_size)
        return _SerfBackwardFunction.apply(grad, x), 0


def _op_setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


_serf_op.register_autograd(_SerfAutograd.backward, setup_context=_op_setup_context)
_serf_backward_op.register_autograd(_SerfBackwardFunction.backward, setup_context=_op_setup_context)


@_serf_op.register_vmap
def _serf_vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
    return _serf_op(x), in_dims[0]


@_serf_backward_op.register_vmap
def _serf_backward_vmap(
    info: Any, in_dims: tuple[int | None, int | None], grad: Tensor, x: Tensor
) -> tuple[Tensor, int]:
    grad_dim, x_dim = in_dims
    return _serf_backward_op(
        _batch_first(grad, grad_dim, info.batch_size), _batch_first(x, x_dim, info.batch_size)
    ), 0


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise UnsupportedDtypeError(
            f"serf() needs a floating-point tensor ({names}), got {x.dtype}; "
            f"convert it first, e.g. x.float()"
        )


# How many keep_custom_op() blocks are open. A module global, not a ContextVar: dynamo reads
# (and guards on) a global while tracing, where a ContextVar lookup would break the graph.
_keep_custom_op_depth = 0


@contextlib.contextmanager
def keep_custom_op() -> Iterator[None]:
    """While open, tracers see ``serfswap::serf`` itself instead of its ATen ops.

    serfswap's :func:`~serfswap.export_onnx` opens it so that its ``custom_translation_table``
    maps each Serf to one exact ONNX pattern. Open it yourself to make a ``torch.export``
    program that keeps the op (it then needs serfswap to load and run). Process-wide, like
    ``torch.onnx``'s own export state: do not trace another model in another thread meanwhile.

    >>> import torch, serfswap
    >>> model = torch.nn.Sequential(serfswap.Serf())
    >>> with serfswap.keep_custom_op():
    ...     program = torch.export.export(model, (torch.randn(2),))
    >>> sum(n.target is torch.ops.serfswap.serf.default for n in program.graph.nodes)
    1
    """
    global _keep_custom_op_depth
    _keep_custom_op_depth += 1
    try:
        yield
    finally:
        _keep_custom_op_depth -= 1


# How Serf is written under the TorchScript ONNX exporter, which has no translation table: the
# ATen ops traced are the decomposition's own (set by serfswap's exporter, aten_for_onnx()).
_onnx_decomposition = "softplus"


@contextlib.contextmanager
def aten_for_onnx(decomposition: str) -> Iterator[None]:
    """While open, tracers see Serf's ATen ops even inside :func:`keep_custom_op`, written
    under ONNX export as ``decomposition`` (``"softplus"``: Softplus, Erf, Mul; ``"exp-log"``:
    Exp, Add, Log, Erf, Mul). serfswap's exporter opens it for torch's TorchScript exporter,
    which maps ATen ops one by one and knows no custom op."""
    global _keep_custom_op_depth, _onnx_decomposition
    saved = _keep_custom_op_depth, _onnx_decomposition
    _keep_custom_op_depth, _onnx_decomposition = 0, decomposition
    try:
        yield
    finally:
        _keep_custom_op_depth, _onnx_decomposition = saved


def _is_traced() -> bool:
    """True under every tracer measured: dynamo (torch.compile, torch.export strict and
    non-strict, the dynamo ONNX exporter) and TorchScript tracing (torch.jit.trace, the
    ``dynamo=False`` ONNX exporter)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _serf_traced(x: Tensor) -> Tensor:
    """Serf in ATen ops, for tracers: no custom op in the graph.

    In the compute dtype, rounded once, like the op. With the negative-tail formula (clamped so
    that its unselected branch has a finite gradient for large x) except under ONNX export, where
    onnxruntime would run its eight extra nodes unfused for a difference below x = -87.
    """
    compute = compute_dtype(x.dtype)
    xc = x if x.dtype == compute else x.to(compute)  # no no-op cast node in the graph
    if torch.onnx.is_in_onnx_export():
        if _onnx_decomposition == "exp-log":
            out = xc * torch.erf(torch.log(torch.exp(xc) + 1.0))
        else:
            out = xc * torch.erf(F.softplus(xc))
    else:
        out = xc * erf_nonnegative(F.softplus(xc))
        start = TAIL_START[compute]
        out = torch.where(xc < start, tail(xc.clamp(max=start)), out)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def serf(x: Tensor) -> Tensor:
    """Serf activation, ``x * erf(softplus(x))``.

    In eager mode it is the ``serfswap::serf`` op, which keeps only ``x`` for backward and works
    with ``torch.func`` (grad, vmap) and autocast. Under a tracer (``torch.compile``,
    ``torch.export``, ``torch.jit.trace``, ``torch.onnx.export`` with either exporter) it is
    standard ATen ops, so traced and exported models run without serfswap; see the module
    docstring for why, and :func:`keep_custom_op` for serfswap's exporter.

    >>> import torch, serfswap
    >>> serfswap.serf(torch.tensor([-1.0, 0.0, 1.0]))
    tensor([-0.3422,  0.0000,  0.9367])
    """
    _check_dtype(x)
    if _is_traced():
        if _keep_custom_op_depth:
            # Dynamo cannot trace an autograd.Function with a custom jvp; the op carries the
            # same autograd rules and stays one node in the graph.
            return _serf_op(x)
        return _serf_traced(x)
    return _SerfAutograd.apply(x)


def serf_composite(x: Tensor) -> Tensor:
    """The plain formula in torch ops, as users write it: the reference for tests and benchmarks.

    Costs three saved tensors per call and loses precision below x = -87 in float32; prefer
    :func:`serf`.
    """
    return x * torch.erf(F.softplus(x))


class Serf(nn.Module):
    """Serf activation module, a drop-in for ``nn.ReLU``/``nn.GELU``/``nn.SiLU``/``nn.Mish``.

    Args:
        inplace: accepted so that Serf fits every ``act_layer(inplace=True)`` call (timm's
            ResNet makes one). Serf always returns a new tensor, as timm's own GELU and Mish do:
            its backward needs the unmodified input, so overwriting it could save nothing in
            training. The flag is kept and shown in ``repr``.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return serf(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""
