"""A probe that counts calls of activation functions, to prove a converted model makes none."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Everything torch offers for the default families, the way modules and model code call them.
PROBED = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
}


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        family = PROBED.get(func)
        if family is not None:
            self.seen[family] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_activation_calls() -> Iterator[_Counter]:
    """Counts calls that reach torch's activation functions (the converted ones never do)."""
    with _Counter() as counter:
        yield counter


class CountSerfOps(TorchDispatchMode):
    """Counts calls of the ``serfswap::serf`` op that reach dispatch (one per Serf run)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.serfswap.serf.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))
