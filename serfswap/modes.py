"""Running a model in a mode without changing the modes the caller left it in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def modes(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """``model`` inside the block, set to train (``True``) or eval (``False``) mode, or left as
    it is (``None``: the block changes modes itself); every submodule gets its own mode back
    after, on an exception too (a model may mix modes, as with frozen BatchNorm in a training
    model, and a caller's model must not come back from a failed call in another mode)."""
    saved = [(m, m.training) for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for module, was_training in saved:
            module.training = was_training


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in eval mode inside the block: :func:`modes` with ``training=False``."""
    return modes(model, False)
