"""The Triton kernels of Serf (serfswap/ops/triton_kernels.py) on CPU, under Triton's interpreter.

They are the CUDA implementation of ``serfswap::serf`` / ``serfswap::serf_backward``; with
``TRITON_INTERPRET=1`` set before triton is imported, their launch functions run on CPU tensors,
so CI (no GPU) checks the kernels' arithmetic against the CPU op. CI runs this file as its own
line of ``.ci/run``; in the main job, which does not set the variable, it is skipped with that
reason. tests/ops/test_serf_gpu.py runs the same checks on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from serfswap.errors import SerfswapError, UnsupportedDtypeError
from tests.support import serf_kernel_checks as checks

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="runs under TRITON_INTERPRET=1 (its own line in .ci/run)",
    ),
    # numpy, running the kernels, warns about the inf and NaN of branches that tl.where drops.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton"),
]

triton_kernels = pytest.importorskip("serfswap.ops.triton_kernels", reason="needs triton")
CPU = torch.device("cpu")


def test_forward_float32_matches_cpu_op() -> None:
    checks.check_forward_float32(triton_kernels.serf_forward, CPU)


def test_backward_float32_matches_cpu_op() -> None:
    checks.check_backward_float32(triton_kernels.serf_backward, CPU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_once_like_cpu_op(dtype: torch.dtype) -> None:
    checks.check_half_types(triton_kernels.serf_forward, triton_kernels.serf_backward, dtype, CPU)


@pytest.mark.parametrize("shape", [(), (1,), (3,), (7, 13), (65_537,)])  # 65537: two programs
def test_odd_sizes(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 10
    grad = torch.randn(shape)
    torch.testing.assert_close(triton_kernels.serf_forward(x), torch.ops.serfswap.serf(x))
    torch.testing.assert_close(
        triton_kernels.serf_backward(grad, x), torch.ops.serfswap.serf_backward(grad, x)
    )


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
def test_empty_tensors(shape: tuple[int, ...]) -> None:
    x = torch.empty(shape)
    assert triton_kernels.serf_forward(x).shape == shape
    assert triton_kernels.serf_backward(x, x).shape == shape


LAYOUTS = {
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(1, 3),
    "sliced": lambda t: t[:, ::2, 1:],
    "expanded": lambda t: t[:1].expand(3, -1, -1, -1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_layout_gives_cpu_op_values_and_strides(layout: str) -> None:
    """Dense layouts are read in place, others copied: the values of a contiguous input, and
    the output strides of the op's fake (``empty_like(x)``), which torch.compile relies on."""
    make = LAYOUTS[layout]
    x, grad = make(torch.randn(2, 4, 5, 6)), make(torch.randn(2, 4, 5, 6))
    got = triton_kernels.serf_forward(x)
    assert torch.equal(got, triton_kernels.serf_forward(x.contiguous()))
    torch.testing.assert_close(got, torch.ops.serfswap.serf(x))
    assert got.stride() == torch.empty_like(x).stride()
    got = triton_kernels.serf_backward(grad, x)
    assert torch.equal(got, triton_kernels.serf_backward(grad.contiguous(), x.contiguous()))
    torch.testing.assert_close(got, torch.ops.serfswap.serf_backward(grad, x))
    assert got.stride() == torch.empty_like(x).stride()


def test_input_is_not_modified() -> None:
    x = torch.randn(100)
    before = x.clone()
    triton_kernels.serf_forward(x)
    triton_kernels.serf_backward(x, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("grad_dtype", "x_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)]
)
def test_backward_with_mixed_dtypes_is_grad_dtype(
    grad_dtype: torch.dtype, x_dtype: torch.dtype
) -> None:
    """Autocast can hand the backward a grad of another dtype than x: float32 math, grad's
    dtype out, as the CPU op."""
    x = torch.linspace(-10, 10, 1001, dtype=x_dtype)
    grad = torch.randn(1001).to(grad_dtype)
    got = triton_kernels.serf_backward(grad, x)
    assert got.dtype == grad_dtype
    torch.testing.assert_close(got, torch.ops.serfswap.serf_backward(grad, x))


def test_float64_and_integers_are_clear_errors() -> None:
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(UnsupportedDtypeError, match="Triton Serf kernels take float32"):
            triton_kernels.serf_forward(torch.zeros(3, dtype=dtype))


def test_backward_shapes_must_match() -> None:
    with pytest.raises(SerfswapError, match="one shape") as info:
        triton_kernels.serf_backward(torch.zeros(3), torch.zeros(4))
    assert isinstance(info.value, ValueError)
