"""Names serfswap has written into files, and where each lives today.

A converted model saved whole (``torch.save(model)``) names serfswap's classes by module and
qualified name, ``serfswap.serf.Serf``; those names are a file format. When a class moves, the
old name must still find it, for plain ``torch.load(weights_only=False)`` (pickle imports the
old module path) and for serfswap's safe loader (which looks names up, imports nothing a file
chooses). This module is the one table of both: :data:`MODULES`, each module path a release
had and the module that holds its contents now, and :data:`PICKLED`, each class name a file
may hold. The old paths are served by generated stub modules (as timm kept
``timm.models.layers``): :func:`install` adds a finder for them to ``sys.meta_path``. Add a
row when a name moves; never remove one.

Importing this module imports nothing heavy (no torch).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# Module paths of serfswap 0.1.0 (before the stage subpackages) -> today's module.
MODULES: dict[str, str] = {
    "serfswap.serf": "serfswap.ops.serf",
    "serfswap.triton_kernels": "serfswap.ops.triton_kernels",
    "serfswap.convert": "serfswap.rewrite.convert",
    "serfswap.activations": "serfswap.rewrite.activations",
    "serfswap.audit": "serfswap.rewrite.audit",
    "serfswap.functional": "serfswap.rewrite.functional",
    "serfswap.positivity": "serfswap.rewrite.positivity",
    "serfswap.report": "serfswap.rewrite.report",
    "serfswap.hooks": "serfswap.rewrite.registration",
    "serfswap.integrations": "serfswap.rewrite.configs",
    "serfswap.recover": "serfswap.recovery.loop",
    "serfswap.distill": "serfswap.recovery.distill",
    "serfswap.trainstate": "serfswap.recovery.state",
    "serfswap.distributed": "serfswap.recovery.distributed",
    "serfswap.curves": "serfswap.recovery.log",
    "serfswap.data": "serfswap.recovery.data",
    "serfswap.export_decoder": "serfswap.export.decoder",
    "serfswap.decompositions": "serfswap.onnx_ops.decompositions",
    "serfswap.onnx_ops.session": "serfswap.runtime.session",
    "serfswap.onnx_ops.generate": "serfswap.runtime.generate",
    "serfswap.safe_pickle": "serfswap.io.safe_pickle",
    "serfswap.paths": "serfswap.io.paths",
    "serfswap.remote_code": "serfswap.io.remote_code",
    "serfswap.cli_generate": "serfswap.cli.generate",
    "serfswap.demo": "serfswap.cli.demos",
}

# Every serfswap class a converted model pickles, under each name it has been written with ->
# its module and qualified name today. The safe loader allows exactly these.
_TODAY: dict[str, str] = {
    "Serf": "serfswap.ops.serf",
    "Plan": "serfswap.rewrite.report",
    "Site": "serfswap.rewrite.report",
    "SerfFunction": "serfswap.rewrite.functional",
    "FunctionalScope": "serfswap.rewrite.functional",
    "FunctionInfo": "serfswap.rewrite.activations",
}
PICKLED: dict[str, tuple[str, str]] = {
    **{f"{module}.{name}": (module, name) for name, module in _TODAY.items()},
    "serfswap.serf.Serf": ("serfswap.ops.serf", "Serf"),
    "serfswap.report.Plan": ("serfswap.rewrite.report", "Plan"),
    "serfswap.report.Site": ("serfswap.rewrite.report", "Site"),
    "serfswap.functional.SerfFunction": ("serfswap.rewrite.functional", "SerfFunction"),
    "serfswap.functional.FunctionalScope": ("serfswap.rewrite.functional", "FunctionalScope"),
    "serfswap.activations.FunctionInfo": ("serfswap.rewrite.activations", "FunctionInfo"),
}


def pickled_class(name: str) -> type | None:
    """The class a pickled serfswap name stands for, or None when it is none of ours."""
    if name not in PICKLED:
        return None
    module, attr = PICKLED[name]
    return getattr(importlib.import_module(module), attr)


class _Stub(types.ModuleType):
    """An old module path: every attribute is read from the module that holds it today."""

    __target__: str

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__target__), name)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__target__))


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the old module paths of :data:`MODULES` as stubs; consulted after the real
    finders, so a path that is a real module today is never shadowed."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        if fullname not in MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        stub = _Stub(spec.name, f"Moved to {MODULES[spec.name]}; this path stays for old files.")
        stub.__target__ = MODULES[spec.name]
        return stub

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Serve the old module paths (once per interpreter)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
