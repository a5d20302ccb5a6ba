"""Serf where users of timm and transformers look for activations: registered as "serf".

``import serfswap`` must not import timm or transformers (they are optional and slow to import),
nor torch (the command line parses and checks its arguments before loading torch), so
registration is a post-import hook: if the library is already imported, Serf is registered at
once; otherwise a ``sys.meta_path`` finder registers it right after the library's activation
module is first imported. Either way ``timm.layers.get_act_layer("serf")`` and
``transformers.activations.ACT2FN["serf"]`` give Serf. Serf itself is imported by the hook,
when the library (and so torch) is; and when torch is imported, so is
:mod:`serfswap.ops.serf`, which registers the custom op ``serfswap::serf``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

NAME = "serf"


def _register_timm(create_act: ModuleType) -> None:
    from ..ops.serf import Serf, serf

    create_act._ACT_LAYER_DEFAULT[NAME] = Serf
    create_act._ACT_FN_DEFAULT[NAME] = serf


def _register_transformers(activations: ModuleType) -> None:
    from ..ops.serf import Serf

    activations.ACT2CLS[NAME] = Serf
    activations.ACT2FN[NAME] = Serf


def _register_op(torch: ModuleType) -> None:
    """The custom op ``serfswap::serf`` exists wherever serfswap and torch are both imported,
    as when the package imported torch itself: ``torch.ops.serfswap.serf``, and torch.export
    programs that keep the op (``keep_custom_op``), which load after ``import serfswap``."""
    importlib.import_module("serfswap.ops.serf")


_HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "torch": _register_op,
    "timm.layers.create_act": _register_timm,
    "transformers.activations": _register_transformers,
}


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then the registration."""

    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader, hook)
                return spec
        return None


def register() -> None:
    """Register Serf as "serf" in timm and transformers, now or when they are imported."""
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
