"""Model classes the golden pickles name: kept at this path so those files stay loadable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttributeFn(nn.Module):
    """A function stored as a plain attribute (timm's GammaAct, torch's Transformer): an
    ``attribute`` site, pickled as serfswap's SerfFunction after conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act_fn = F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.fc(x))


class FunctionalFn(nn.Module):
    """An activation called in the module's own code: a ``functional`` site (the module keeps a
    FunctionalScope after conversion)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc(x))
