"""Activation calls that live outside any model class: what static reading of a model's own
methods cannot see (tests/rewrite/test_audit.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def act(x: Tensor) -> Tensor:
    """A helper in another module, as model code often has."""
    return F.gelu(x)


def relu_act(x: Tensor) -> Tensor:
    return F.relu(x)


class SigmoidGELU(nn.GELU):
    """A GELU class computing by itself (``x * sigmoid(1.702 x)``, like QuickGELU): built during
    a forward, no function call of it reaches a scope."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)
