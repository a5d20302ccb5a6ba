"""Forward accuracy of serfswap.serf against a float64 reference, special values and layouts."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import serfswap
from serfswap.ops.formula import fix_negative_tail
from serfswap.ops.serf import serf_composite
from tests.support.reference import serf_reference

F32_MAX_REL_ERR = 5e-7
HALF_TYPES = [torch.float16, torch.bfloat16]


def sweep(dtype: torch.dtype) -> torch.Tensor:
    """A dense sweep of [-100, 100] (step 1e-4) plus the values where formulas break."""
    info = torch.finfo(dtype)
    dense = torch.linspace(-100, 100, 2_000_001, dtype=torch.float64)
    special = [
        1e4,
        -1e4,
        float("inf"),
        float("-inf"),
        float("nan"),
        0.0,
        -0.0,
        info.max,
        -info.max,
        info.tiny,
        -info.tiny,
        info.smallest_normal / 4,
        -info.smallest_normal / 4,
        1e-40,
        -1e-40,
        -87.0,
        -87.5,
        -90.0,
        -91.9,
        -104.0,
    ]
    return torch.cat([dense, torch.tensor(special, dtype=torch.float64)]).to(dtype)


def test_float32_relative_error_where_result_is_normal() -> None:
    x = sweep(torch.float32)
    got = serfswap.serf(x).double()
    ref = serf_reference(x)
    tiny = torch.finfo(torch.float32).tiny
    normal = torch.isfinite(ref) & (ref.abs() >= tiny)
    rel = ((got - ref).abs() / ref.abs())[normal]
    assert rel.max().item() <= F32_MAX_REL_ERR, f"max rel err {rel.max().item():.3g}"
    # Subnormal and zero results: the relative bound carried down to the smallest normal,
    # plus the final rounding to one subnormal spacing.
    small = torch.isfinite(ref) & (ref.abs() < tiny)
    bound = F32_MAX_REL_ERR * tiny + 2.0**-149
    assert (got - ref)[small].abs().max().item() <= bound


def test_composite_is_worse_in_the_subnormal_tail() -> None:
    """Why the op has a tail formula: the plain composite loses precision below x = -87.3."""
    x = torch.linspace(-91.5, -87.5, 10_001)
    ref = serf_reference(x)
    rel_op = ((serfswap.serf(x).double() - ref).abs() / ref.abs()).max().item()
    rel_naive = ((serf_composite(x).double() - ref).abs() / ref.abs()).max().item()
    assert rel_op <= F32_MAX_REL_ERR < rel_naive


def test_special_values() -> None:
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e4, -1e4])
    y = serfswap.serf(x)
    assert torch.isnan(y[0])
    assert y[1] == float("inf")
    assert torch.isnan(y[2]), "documented: Serf(-inf) is NaN, as in the ONNX graph"
    assert y[3] == 0 and not torch.signbit(y[3])
    assert y[4] == 0 and torch.signbit(y[4])
    assert y[5] == 1e4
    assert y[6] == 0


def _round_to(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly rounded value of the float64 ``ref`` in ``dtype`` (no double rounding)."""
    first = ref.to(dtype)
    up = torch.nextafter(first, torch.full_like(first, float("inf")))
    down = torch.nextafter(first, torch.full_like(first, float("-inf")))
    cands = torch.stack([first, up, down])
    err = (cands.double() - ref).abs().nan_to_num(nan=float("inf"))
    return cands.gather(0, err.argmin(0, keepdim=True))[0]


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_types_within_one_ulp_of_correctly_rounded(dtype: torch.dtype) -> None:
    x = sweep(dtype)
    got = serfswap.serf(x)
    assert got.dtype == dtype
    ref = serf_reference(x)
    finite = torch.isfinite(ref)
    rounded = _round_to(ref[finite], dtype)
    ulp = (
        torch.nextafter(rounded.abs(), torch.full_like(rounded, float("inf"))).double()
        - rounded.abs().double()
    )
    err = (got[finite].double() - rounded.double()).abs()
    assert (err <= ulp).all(), f"worst: {(err / ulp).max().item():.2f} ulp"
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(got[torch.isinf(ref)].double(), ref[torch.isinf(ref)])


def test_float64_matches_high_precision_reference() -> None:
    """float64 against mpmath at 60 digits, down into the float64 tail (x < -708)."""
    mpmath = pytest.importorskip("mpmath")  # ships with torch (through sympy)
    x = torch.cat(
        [
            torch.linspace(-745, 40, 1571, dtype=torch.float64),
            torch.tensor([-709.0, -712.0, -714.0, -715.07, 1e-300, -1e-300], dtype=torch.float64),
        ]
    )
    got = serfswap.serf(x)
    with mpmath.workdps(60):
        ref = torch.tensor(
            [float(mpmath.mpf(v) * mpmath.erf(mpmath.log1p(mpmath.exp(v)))) for v in x.tolist()],
            dtype=torch.float64,
        )
    normal = ref.abs() >= torch.finfo(torch.float64).tiny
    rel = ((got - ref).abs() / ref.abs())[normal]
    assert rel.max().item() < 1e-15, f"max rel err {rel.max().item():.3g}"


@pytest.mark.parametrize("sync_free", [False, True])
def test_tail_paths_agree(sync_free: bool) -> None:
    """The CPU branch (reduction + masked write) and the accelerator branch (where) agree."""
    x = sweep(torch.float32)
    out = F.softplus(x).erf_().mul_(x)
    fix_negative_tail(x, out, sync_free=sync_free)
    torch.testing.assert_close(out, serfswap.serf(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_TYPES])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: torch.randn(3, 5, 7, dtype=d), id="contiguous"),
        pytest.param(lambda d: torch.randn(6, 10, dtype=d)[::2, 1::3], id="strided"),
        pytest.param(lambda d: torch.randn(4, 5, dtype=d).t(), id="transposed"),
        pytest.param(
            lambda d: torch.randn(2, 3, 4, 4, dtype=d).to(memory_format=torch.channels_last),
            id="channels_last",
        ),
        pytest.param(lambda d: torch.randn(5, dtype=d).expand(3, 5), id="expanded"),
        pytest.param(lambda d: torch.randn((), dtype=d), id="0-d"),
        pytest.param(lambda d: torch.randn(0, 3, dtype=d), id="empty"),
    ],
)
def test_any_shape_and_layout(make, dtype: torch.dtype) -> None:
    x = make(dtype)
    y = serfswap.serf(x)
    assert y.shape == x.shape and y.dtype == dtype
    expected = serf_reference(x).to(dtype)
    # float32: the accuracy bound; float64: a few ulps; half types: one ulp.
    rtol = {torch.float32: F32_MAX_REL_ERR, torch.float64: 1e-15}.get(dtype, torch.finfo(dtype).eps)
    torch.testing.assert_close(y, expected, rtol=rtol, atol=0)


def test_input_is_not_modified_even_with_inplace_flag() -> None:
    x = torch.randn(100)
    before = x.clone()
    act = serfswap.Serf(inplace=True)
    y = act(x)
    assert torch.equal(x, before)
    assert y.data_ptr() != x.data_ptr()
    assert "inplace=True" in repr(act)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_input_is_a_clear_error(dtype: torch.dtype) -> None:
    x = torch.zeros(3, dtype=dtype)
    with pytest.raises(serfswap.UnsupportedDtypeError, match=re.escape("x.float()")) as info:
        serfswap.serf(x)
    assert isinstance(info.value, TypeError)
    assert str(dtype) in str(info.value)
