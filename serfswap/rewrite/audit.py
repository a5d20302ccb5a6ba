"""The run-time audit: which activations actually run in one forward, and inside which module.

Static reading of a model's source (:mod:`serfswap.functional`) cannot see every call path:
helpers in other modules, reference kernels that pick the activation by a string and build it
on the fly (transformers' ``ACT2FN[activation](x)`` inside Mamba's ``causal_conv1d_fn``), code
generated at import. So :func:`serfswap.convert` also runs the model once on example inputs
under an :class:`ActivationRecorder` and lists what still computes an activation.

How it attributes a call to a module: global forward hooks keep a stack of the modules running
(``torch.nn.modules.module.register_module_forward_pre_hook``, so modules built during the
forward count too); a call belongs to the innermost module that is part of the model. The
recorder is a ``TorchFunctionMode`` entered *before* the model's own scopes, so it sits under
:class:`serfswap.functional.SerfDispatchMode`: a call that a scope turned into Serf reaches it as
``serfswap::serf``, not as the activation, and is not counted as left.

What it records:
* a call of an activation function (``F.silu``, ``torch.relu``, ``x.relu()``...), with the
  first Python frame that is neither torch's, serfswap's nor an activation class's own forward:
  the line of model code that asked for it;
* an activation *module* of the model that ran (one the conversion left), and an activation
  module built during the forward that computed without any activation function or Serf
  (``x * torch.sigmoid(1.702 * x)``): no scope can reach what it computes.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..modes import eval_mode
from .activations import GATE, class_family, function_info
from .functional import function_name
from .where import where

_SERF_OPS = ("serfswap.serf", "serfswap::serf")
# Frames in serfswap's own files (this package's folder) and torch's are not the model's code.
_SKIPPED_FILES = (f"{Path(__file__).parents[1]}/", "/torch/")


@dataclass(frozen=True)
class Ran:
    """An activation that ran: in which module of the model, what, and from which line."""

    name: str  # the module's name in the model ("" for the root)
    owner: nn.Module
    family: str
    call: str  # "F.silu", or the class of an activation module
    where: str  # "modeling_mamba.py:274 in mamba_selective_scan"; "" for a module of the model
    kind: str  # "function"; "module": one of the model's; "built": one built during the forward


@dataclass
class _Frame:
    module: nn.Module
    activation: str | None  # the module's family, if it is an activation module
    computed: bool = False  # an activation function or Serf ran inside it


def _where() -> str:
    """The line of model code that asked for the activation: the first frame outside torch,
    serfswap and activation classes' own forwards."""
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        owner = frame.f_locals.get("self")
        own = isinstance(owner, nn.Module) and class_family(type(owner)) is not None
        if not own and not any(part in code.co_filename for part in _SKIPPED_FILES):
            method = getattr(code, "co_qualname", code.co_name)
            return where(code.co_filename, frame.f_lineno, method)
        frame = frame.f_back
    return ""


class ActivationRecorder(TorchFunctionMode):
    """Records the activations that run while it is active; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.root = model
        self.names = {id(module): name for name, module in _named(model)}
        self.stack: list[_Frame] = []
        self.ran: dict[Ran, int] = {}
        self.serf_calls = 0

    def _owner(self) -> tuple[str, nn.Module]:
        for frame in reversed(self.stack):
            name = self.names.get(id(frame.module))
            if name is not None:
                return name, frame.module
        return "", self.root

    def _add(self, ran: Ran) -> None:
        self.ran[ran] = self.ran.get(ran, 0) + 1

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        info = function_info(func)
        if info is not None or str(func).startswith(_SERF_OPS):
            if self.stack:
                self.stack[-1].computed = True
            if info is None:
                self.serf_calls += 1
            elif not (self.stack and self.stack[-1].activation and self._is_model(-1)):
                # a call inside an activation module of the model is that module's (see below)
                name, owner = self._owner()
                self._add(Ran(name, owner, info.family, function_name(func), _where(), "function"))
        return func(*args, **(kwargs or {}))

    def _is_model(self, index: int) -> bool:
        return id(self.stack[index].module) in self.names

    def enter(self, module: nn.Module, *_: Any) -> None:
        family = class_family(type(module))
        self.stack.append(_Frame(module, family if family not in (None, GATE) else None))

    def leave(self, module: nn.Module, *_: Any) -> None:
        if not self.stack or self.stack[-1].module is not module:
            return  # a forward that raised: the stack is discarded with the recorder
        frame = self.stack.pop()
        if frame.computed and self.stack:
            self.stack[-1].computed = True
        if frame.activation is None:
            return
        if id(module) in self.names:  # an activation module of the model ran: it was left
            name = self.names[id(module)]
            self._add(Ran(name, module, frame.activation, type(module).__name__, "", "module"))
        elif not frame.computed:  # built during the forward, computing by itself
            name, owner = self._owner()
            where = _where()
            self._add(Ran(name, owner, frame.activation, type(module).__name__, where, "built"))


def _named(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Each module once, the root first, shared instances under their first name."""
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in seen:
            seen.add(id(module))
            yield name, module


@contextlib.contextmanager
def _hooks(recorder: ActivationRecorder) -> Iterator[None]:
    handles: list[RemovableHandle] = [
        nn.modules.module.register_module_forward_pre_hook(recorder.enter),
        nn.modules.module.register_module_forward_hook(recorder.leave, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> ActivationRecorder:
    """One forward of ``model`` on keyword ``inputs`` (eval mode, no grad, the caller's random
    state untouched) under a recorder; returns it with what ran."""
    recorder = ActivationRecorder(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(model))
        stack.enter_context(_hooks(recorder))
        stack.enter_context(recorder)
        model(**inputs)
    return recorder
