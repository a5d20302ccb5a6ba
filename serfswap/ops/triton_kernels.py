"""Fused Triton kernels for Serf on CUDA: one read and one write per element, each way.

``serf_forward(x)`` computes ``Serf(x)`` and ``serf_backward(grad, x)`` computes
``grad * Serf'(x)`` in a single pass each, in float32 for float32, float16 and bfloat16 inputs
(rounded once, on the store), with the tail formula of :mod:`serfswap.ops.formula` below x = -80.
:mod:`serfswap.ops.serf` registers them as the CUDA kernels of ``serfswap::serf`` and
``serfswap::serf_backward``; callers never call them directly.

The launch functions take any device Triton runs on, so that the kernels are testable without a
GPU: with ``TRITON_INTERPRET=1`` set before ``triton`` is imported, they run on CPU tensors
(``tests/ops/test_triton_interpret.py``).

Why ``exp`` and ``log1p`` are written out here instead of ``tl.exp`` / ``libdevice.log1p``:

* ``tl.exp`` lowers to the GPU's approximate ``ex2`` of ``x * log2(e)``; rounding that product
  costs up to 22 float32 ulps of relative error at x = -80, where Serf(x) is ``x * exp(x)``.
  ``tl.log`` near 1 has a large relative error for the same reason (``lg2.approx``), and
  softplus of a negative x is ``log(1 + tiny)``.
* ``libdevice`` calls are external functions that Triton's interpreter cannot run, so a kernel
  using them could not be tested on CPU.
* Written from adds, multiplies, one correctly rounded division and exponent bit arithmetic, the
  kernels compute the same numbers under the interpreter and on the GPU, up to fused
  multiply-adds; only ``erf`` (``tl.math.erf``) differs between the two.

This module imports ``triton`` at import time: import it lazily (``serfswap.ops.serf`` does, on the
first CUDA call), so that ``import serfswap`` works where Triton is absent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedDtypeError

__all__ = ["KERNEL_DTYPES", "serf_backward", "serf_forward"]

# float64 is not here: its exp/log1p would need their own polynomials, and serfswap.serf keeps
# its ATen path for it on CUDA.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per program. Each thread of 4 warps handles 8 contiguous elements (two 16-byte loads
# in float32), the shape inductor picks for a pointwise kernel of this size.
_BLOCK = 1024
_NUM_WARPS = 4
# Under Triton's interpreter (CPU tensors) each program is a round of numpy calls: large blocks
# keep the interpreter tests fast. Results do not depend on the block (elementwise, masked).
_INTERPRETER_BLOCK = 1 << 16

_TWO_OVER_SQRT_PI: tl.constexpr = tl.constexpr(1.1283791670955126)  # erf'(s) = 2/sqrt(pi) e^-s^2
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
# ln 2 split in two (Cody and Waite): _LN2_HI has 16 significant bits, so k * _LN2_HI is exact
# for every |k| <= 128 and x - k * ln 2 keeps full precision.
_LN2_HI: tl.constexpr = tl.constexpr(0.693145751953125)
_LN2_LO: tl.constexpr = tl.constexpr(1.4286068203094173e-06)
_TAIL_START: tl.constexpr = tl.constexpr(-80.0)  # as serfswap.ops.formula.TAIL_START, float32
_SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(20.0)  # torch's softplus returns x above it


@triton.jit
def _exp_parts(a):
    """exp(a) = m * 2^k, m in [0.7, 1.42] within about 1 ulp, for a in [-200, 88].

    Range reduction a = k ln2 + r, |r| <= ln2 / 2, then exp(r) = 1 + (r + r^2 P(r)), P the
    Taylor series to r^5 / 7! (truncation below 0.06 ulp): adding 1 last keeps the rounding of
    the small part small. m is NaN for a NaN and 0 below a = -200 (-inf included), where
    exp(a) * anything finite underflows. Returned in parts so that the tail can scale
    x * exp(x) straight into the subnormal range (:func:`_times_pow2`).
    """
    clamped = tl.minimum(tl.maximum(a, -200.0), 88.0)
    clamped = tl.where(a == a, clamped, 0.0)  # a NaN gets a finite k; the NaN is put back below
    k = tl.floor(clamped * _LOG2E + 0.5)
    r = clamped - k * _LN2_HI - k * _LN2_LO
    p = r * (1.0 / 5040.0) + (1.0 / 720.0)
    p = p * r + (1.0 / 120.0)
    p = p * r + (1.0 / 24.0)
    p = p * r + (1.0 / 6.0)
    p = p * r + 0.5
    m = 1.0 + (r + r * r * p)
    m = tl.where(a < -200.0, 0.0, m)
    return tl.where(a == a, m, a), k


@triton.jit
def _pow2(k):
    """2^k for an integral float k in [-126, 127], from its exponent bits."""
    return ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _times_pow2(v, k):
    """v * 2^k for k in [-289, 127], in two normal factors: rounded once, also where the result
    is subnormal. k is clamped at -252, below which |v| < 400 underflows to zero either way."""
    k = tl.maximum(k, -252.0)
    k_low = tl.floor(k * 0.5)
    return v * _pow2(k_low) * _pow2(k - k_low)


@triton.jit
def _log1p_unit(t):
    """log(1 + t) for t in [0, 1] within about 1.2 ulp, without rounding 1 + t (which would lose
    all of a small t): log1p(t) = 2 atanh(s), s = t / (2 + t) in [0, 1/3], and since
    2s = t - ts, 2 atanh(s) = t - s (t - 2 s^2 Q(s^2)), Q = 1/3 + s^2/5 + ... to s^12/15
    (remainder below 0.03 ulp). The exact t is the leading term; the rest is at most t/3."""
    s = tl.math.div_rn(t, 2.0 + t)
    z = s * s
    q = z * (1.0 / 15.0) + (1.0 / 13.0)
    q = q * z + (1.0 / 11.0)
    q = q * z + (1.0 / 9.0)
    q = q * z + (1.0 / 7.0)
    q = q * z + (1.0 / 5.0)
    q = q * z + (1.0 / 3.0)
    return t - s * (t - 2.0 * z * q)


@triton.jit
def _softplus_and_exp(x):
    """torch's softplus (beta 1, threshold 20), and exp(-|x|) as (m, k) of :func:`_exp_parts`.

    softplus(x) = max(x, 0) + log1p(exp(-|x|)), equal to log1p(exp(x)) with no overflow; x
    itself above 20, as torch. For x < 0, exp(-|x|) = exp(x), which the tails reuse.
    """
    m, k = _exp_parts(-tl.abs(x))
    sp = tl.maximum(x, 0.0) + _log1p_unit(_times_pow2(m, k))
    return tl.where(x > _SOFTPLUS_THRESHOLD, x, sp), m, k


@triton.jit
def _load_f32(ptr, offsets, mask, BF16_BITS: tl.constexpr):
    """Load as float32. With BF16_BITS, ``ptr`` holds bfloat16 bit patterns as int16, widened
    exactly by a shift: Triton's interpreter converts bfloat16 subnormals wrongly."""
    if BF16_BITS:
        bits = tl.load(ptr + offsets, mask=mask).to(tl.int32)
        return (bits << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offsets, mask=mask).to(tl.float32)


@triton.jit
def _store_rounded(ptr, offsets, value, mask, BF16_BITS: tl.constexpr):
    """Store ``value`` (float32) rounded once to nearest-even in the pointer's dtype.

    With BF16_BITS the rounding to bfloat16 is done on the bits (add 0x7FFF plus the lowest kept
    bit, shift), because the interpreter's own conversion does not round to nearest-even; on the
    GPU it gives what ``cvt.rn.bf16.f32`` gives. NaN stays NaN (a quiet one)."""
    if BF16_BITS:
        bits = value.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(ptr + offsets, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _serf_forward_kernel(
    x_ptr, out_ptr, n, BLOCK: tl.constexpr, X_BF16: tl.constexpr, OUT_BF16: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = _load_f32(x_ptr, offsets, mask, X_BF16)
    sp, m, k = _softplus_and_exp(x)
    out = x * tl.math.erf(sp)
    # Below x = -80, Serf(x) = 2/sqrt(pi) x exp(x) to full precision (softplus(x) = exp(x) and
    # erf(s) = 2/sqrt(pi) s there), scaled into the subnormal range in one rounding: the values
    # serfswap.serf's tail formula computes, with fewer roundings. x * m first: m is 0 below
    # x = -200, so a huge finite x gives -0 (not -inf from x * 2/sqrt(pi)) and -inf gives NaN.
    tail = _times_pow2(x * m * _TWO_OVER_SQRT_PI, k)
    out = tl.where(x < _TAIL_START, tail, out)
    _store_rounded(out_ptr, offsets, out, mask, OUT_BF16)


@triton.jit
def _serf_backward_kernel(
    grad_ptr,
    x_ptr,
    out_ptr,
    n,
    BLOCK: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    X_BF16: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = _load_f32(x_ptr, offsets, mask, X_BF16)
    grad = _load_f32(grad_ptr, offsets, mask, GRAD_BF16)
    sp, m, k = _softplus_and_exp(x)
    # Serf'(x) = erf(sp) + 2/sqrt(pi) x sigmoid(x) exp(-sp^2), with the gate
    # sigmoid(x) exp(-sp^2) = exp(x - sp - sp^2), as the CPU backward (serf._grad_kernel).
    gate_m, gate_k = _exp_parts(x - (sp + sp * sp))
    gate = _times_pow2(gate_m, gate_k)
    derivative = tl.math.erf(sp) + _TWO_OVER_SQRT_PI * gate * x
    # Below x = -80, Serf'(x) = 2/sqrt(pi) (1 + x) exp(x) to full precision. The sum above
    # would add two terms whose exponentials go subnormal below x = -87.3 and lose their bits.
    tail = _times_pow2((1.0 + x) * m * _TWO_OVER_SQRT_PI, k)
    derivative = tl.where(x < _TAIL_START, tail, derivative)
    _store_rounded(out_ptr, offsets, grad * derivative, mask, OUT_BF16)


def _check_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise UnsupportedDtypeError(
            f"the Triton Serf kernels take {names}; {name} is {t.dtype} "
            f"(serfswap.serf computes the others with ATen ops)"
        )


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t``, or a copy of it with the strides of ``like`` (which is dense) when they differ.

    Strides of size-1 dimensions do not matter. When the strides agree, ``t`` is as dense as
    ``like``, so both can be walked as one flat run of memory in the same element order.
    """
    same = all(
        size == 1 or a == b
        for size, a, b in zip(like.shape, t.stride(), like.stride(), strict=True)
    )
    return t if same else torch.empty_like(like, dtype=t.dtype).copy_(t)


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (its strides may be any permutation);
    bfloat16 as its int16 bit patterns (see :func:`_load_f32`)."""
    flat = t.as_strided((t.numel(),), (1,))
    return flat.view(torch.int16) if t.dtype == torch.bfloat16 else flat


def _launch(kernel: triton.JITFunction, out: Tensor, *inputs: Tensor, **flags: bool) -> None:
    """One program per block of elements over ``out`` and the inputs, all dense, one layout."""
    n = out.numel()
    block = _BLOCK if out.is_cuda else _INTERPRETER_BLOCK
    flat = [_flat(t) for t in (*inputs, out)]
    kernel[(triton.cdiv(n, block),)](*flat, n, BLOCK=block, num_warps=_NUM_WARPS, **flags)


def serf_forward(x: Tensor) -> Tensor:
    """``Serf(x)`` in one pass; the result has the layout of ``torch.empty_like(x)``.

    A dense input of any dimension order (contiguous, channels-last, transposed) is read in
    place; any other layout (a slice with gaps, an expanded tensor) is first copied densely.
    """
    _check_dtype(x, "x")
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    bf16 = torch.bfloat16
    _launch(
        _serf_forward_kernel,
        out,
        _in_layout_of(x, out),
        X_BF16=x.dtype == bf16,
        OUT_BF16=out.dtype == bf16,
    )
    return out


def serf_backward(grad: Tensor, x: Tensor) -> Tensor:
    """``grad * Serf'(x)`` in one pass, in ``grad``'s dtype with ``x``'s layout.

    ``grad`` and ``x`` must have one shape (autograd guarantees it) and may differ in dtype
    (autocast): both are computed in float32.
    """
    _check_dtype(x, "x")
    _check_dtype(grad, "grad")
    if grad.shape != x.shape:
        raise ShapeMismatchError(
            f"serf_backward needs grad and x of one shape, got {tuple(grad.shape)} "
            f"and {tuple(x.shape)}"
        )
    out = torch.empty_like(x, dtype=grad.dtype)
    if out.numel() == 0:
        return out
    bf16 = torch.bfloat16
    _launch(
        _serf_backward_kernel,
        out,
        _in_layout_of(grad, out),
        _in_layout_of(x, out),
        GRAD_BF16=grad.dtype == bf16,
        X_BF16=x.dtype == bf16,
        OUT_BF16=out.dtype == bf16,
    )
    return out
