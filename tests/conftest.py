"""Shared helpers for the tests: fixed seeds and the float64 reference of Serf."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def serf_reference(x: torch.Tensor) -> torch.Tensor:
    """Serf in float64, from the exact float64 value of every input element."""
    x64 = x.double()
    return x64 * torch.erf(F.softplus(x64))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
