"""The comparisons of a Serf kernel with the CPU op, shared by the interpreter and GPU tests.

Each check takes ``forward(x)`` / ``backward(grad, x)`` callables (the Triton launch functions
under ``TRITON_INTERPRET=1``, the registered CUDA op on a GPU) and the device they run on, feeds
them the same inputs as the CPU op ``torch.ops.serfswap`` and compares on the CPU.

Why the float32 bounds are 4 and 5 ulp and not 2: the CPU op itself is up to 3.9 ulp from the
true value (float64) on [-100, 100], from its own exp, log1p, erf and tail roundings, so two
implementations each as accurate can differ by more than 2. The kernels are held to what makes
that difference small: their own error against float64 is at most the CPU op's on the same sweep
(forward), and their results agree with the CPU op's to the bounds below, measured on the
interpreter (forward 4.0 ulp, backward 5.0 ulp of the backward's scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.support.reference import serf_reference

Forward = Callable[[Tensor], Tensor]
Backward = Callable[[Tensor, Tensor], Tensor]

FORWARD_ULPS = 4  # kernel vs CPU op, float32 forward (measured max 4.0 on the sweep)
BACKWARD_ULPS = 5  # kernel vs CPU op, float32 backward, in ulps of its scale (measured 5.0)
# Below this x the CPU backward adds two terms whose exp(x) is subnormal and loses up to 190 ulp;
# the kernels use 2/sqrt(pi) (1 + x) exp(x) there and are compared with float64 instead.
CPU_BACKWARD_EXACT_FROM = -87.3
BACKWARD_TAIL_ULPS = 4  # kernel vs float64 below CPU_BACKWARD_EXACT_FROM (measured 3.1)

SPECIAL_VALUES = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    3.4028234663852886e38,
    -3.4028234663852886e38,
    -3.0e38,
    1e-45,
    -1e-45,
    1.2e-38,
    -1.2e-38,
    20.0,
    20.000002,
    19.999998,
    -80.0,
    -80.00001,
    -79.99999,
    -87.3,
    -87.7,
    -91.9,
    -103.9,
    -104.0,
    -174.7,
    -200.0,
    -1e30,
    1e30,
]


def ulp32(v: Tensor) -> Tensor:
    """The float32 ulp at each |v| (float64), 2^-149 (the smallest subnormal) at and near 0."""
    v = v.double().abs()
    exponent = torch.frexp(v)[1] - 24
    ulp = torch.ldexp(torch.ones_like(v), exponent.clamp(min=-149))
    return torch.where(v == 0, 2.0**-149, ulp)


def sweep() -> Tensor:
    """[-100, 100] in steps of 1e-4, float32 (2M points): every region of the op."""
    return torch.linspace(-100, 100, 2_000_001)


def _on(device: torch.device, *tensors: Tensor) -> list[Tensor]:
    return [t.to(device) for t in tensors]


def same_nans(a: Tensor, b: Tensor) -> bool:
    return bool(torch.equal(a.isnan(), b.isnan()))


def check_forward_float32(forward: Forward, device: torch.device) -> None:
    x = torch.cat([sweep(), torch.tensor(SPECIAL_VALUES)])
    (x_dev,) = _on(device, x)
    got = forward(x_dev).cpu()
    cpu = torch.ops.serfswap.serf(x)
    assert same_nans(got, cpu)
    finite = cpu.isfinite()
    err = (got.double() - cpu.double()).abs()[finite] / ulp32(cpu)[finite]
    worst = err.argmax()
    assert err.max() <= FORWARD_ULPS, f"{err.max().item():.1f} ulp at x = {x[finite][worst].item()}"
    # Infinities and signed zeros exactly (err is NaN for inf - inf, and blind to the sign of 0).
    exact = cpu.isinf() | (cpu == 0)
    assert torch.equal(got[exact], cpu[exact])
    assert torch.equal(got[exact].signbit(), cpu[exact].signbit())
    # No less accurate than the CPU op against float64, on the sweep.
    xs = sweep()
    truth = serf_reference(xs)
    got_err = ((got[: xs.numel()].double() - truth).abs() / ulp32(truth)).max()
    cpu_err = ((cpu[: xs.numel()].double() - truth).abs() / ulp32(truth)).max()
    assert got_err <= cpu_err, f"kernel {got_err.item():.2f} ulp, CPU op {cpu_err.item():.2f}"


def _backward_scale(grad: Tensor, x: Tensor) -> Tensor:
    """|grad| (|erf(sp)| + |2/sqrt(pi) x sigmoid(x) exp(-sp^2)|) in float64: the size of the
    two terms of Serf' that are summed, whose rounding sets the error of any implementation
    (Serf' crosses 0 near x = -1.2, where a relative error means nothing)."""
    x64 = x.double()
    sp = F.softplus(x64)
    gate_term = 2 / math.sqrt(math.pi) * x64 * torch.sigmoid(x64) * torch.exp(-sp * sp)
    return grad.double().abs() * (torch.erf(sp).abs() + gate_term.abs())


def serf_derivative_reference(x: Tensor) -> Tensor:
    """Serf'(x) in float64."""
    x64 = x.double()
    sp = F.softplus(x64)
    gate = torch.sigmoid(x64) * torch.exp(-sp * sp)
    return torch.erf(sp) + 2 / math.sqrt(math.pi) * x64 * gate


def check_backward_float32(backward: Backward, device: torch.device) -> None:
    x = torch.cat([sweep(), torch.tensor(SPECIAL_VALUES)])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = backward(*_on(device, grad, x)).cpu()
    cpu = torch.ops.serfswap.serf_backward(grad, x)
    assert same_nans(got, cpu)
    scale_ulp = ulp32(_backward_scale(grad, x))
    finite = cpu.isfinite() & x.isfinite()
    near = finite & (x >= CPU_BACKWARD_EXACT_FROM)
    err = (got.double() - cpu.double()).abs()[near] / scale_ulp[near]
    assert err.max() <= BACKWARD_ULPS, f"{err.max().item():.1f} ulp at x = {x[near][err.argmax()]}"
    tail = finite & (x < CPU_BACKWARD_EXACT_FROM)
    truth = grad.double()[tail] * serf_derivative_reference(x[tail])
    tail_err = (got.double()[tail] - truth).abs() / scale_ulp[tail]
    assert tail_err.max() <= BACKWARD_TAIL_ULPS, f"{tail_err.max().item():.1f} ulp in the tail"


def all_values(dtype: torch.dtype) -> Tensor:
    """Every bit pattern of a 16-bit float type: finite, subnormal, inf and NaN."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _check_one_rounding(got: Tensor, got32: Tensor, cpu: Tensor, cpu32: Tensor) -> None:
    """``got`` is ``got32`` rounded once; where it differs from the CPU op's ``cpu``, their
    float32 values (within the float32 bound) lie on two sides of a rounding boundary."""
    dtype = got.dtype
    assert same_nans(got, got32.to(dtype)) and same_nans(got, cpu)
    finite = ~got.isnan()
    assert torch.equal(got[finite], got32.to(dtype)[finite])
    differ = finite & (got != cpu)
    assert torch.equal(cpu32.to(dtype)[differ], cpu[differ])  # the CPU op rounds once, too
    assert (got32.to(dtype)[differ] != cpu32.to(dtype)[differ]).all()
    assert differ.sum() <= 4, f"{int(differ.sum())} values differ from the CPU op's rounding"


def check_half_types(forward: Forward, backward: Backward, dtype: torch.dtype, device) -> None:
    """Exhaustively: the kernel's half result is its float32 result rounded once, and the CPU
    op's except where two float32 values within a few ulp straddle a rounding boundary
    (3 of the 2 x 65536 float16 values on the interpreter, none in bfloat16)."""
    x = all_values(dtype)
    x32 = x.float()
    (x_dev, x32_dev) = _on(device, x, x32)
    got, got32 = forward(x_dev).cpu(), forward(x32_dev).cpu()
    _check_one_rounding(got, got32, torch.ops.serfswap.serf(x), torch.ops.serfswap.serf(x32))
    grad = torch.ones_like(x)
    grad_dev, grad32_dev = _on(device, grad, grad.float())
    got, got32 = backward(grad_dev, x_dev).cpu(), backward(grad32_dev, x32_dev).cpu()
    cpu = torch.ops.serfswap.serf_backward(grad, x)
    cpu32 = torch.ops.serfswap.serf_backward(grad.float(), x32)
    # Below -87.3 the kernel's float32 backward is the accurate one (CPU_BACKWARD_EXACT_FROM);
    # there only its single rounding is checked.
    near = x32 >= CPU_BACKWARD_EXACT_FROM
    assert torch.equal(got[~near & ~got.isnan()], got32.to(dtype)[~near & ~got.isnan()])
    _check_one_rounding(got[near], got32[near], cpu[near], cpu32[near])
