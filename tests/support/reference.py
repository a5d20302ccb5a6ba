"""The float64 reference of Serf and the CUDA skip mark, shared by the op's tests and the
kernel checks (a support module, not conftest.py: pytest does not mean conftest to be imported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def serf_reference(x: torch.Tensor) -> torch.Tensor:
    """Serf in float64, from the exact float64 value of every input element."""
    x64 = x.double()
    return x64 * torch.erf(F.softplus(x64))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
