"""Unpickling a file a user did not write, without running code from it.

A pickle is a program: it names globals and calls them. A list of trusted *module prefixes*
(``torch.``, ``transformers.``) is no boundary, because those packages hold functions that
``exec`` source (``torch.fx.graph_module._forward_from_src``), write files
(``torch.serialization.save``) or import files (``torch.hub._load_local``), and because the
unpickler resolves dotted names: under protocol 4, module ``torch`` with name ``os.system`` is
``os.system``.

So serfswap never lets a file choose what to import. torch's weights-only unpickler
(``torch.load(weights_only=True)``) looks every global up in a table of objects it is given, by
the exact ``module.name`` string, and imports nothing. serfswap puts an object in that table
only when the file needs it and it is one of:

* a **class** defined in ``torch.nn.modules``, ``timm.layers`` / ``timm.models``, a
  transformers model's ``modeling_*`` / ``configuration_*`` module (or the few shared modules
  listed in ``_MODULES``) or serfswap's own model-state modules, named by the file exactly as
  it is defined (``__module__`` and ``__qualname__`` equal the name: no dotted paths), that is

  - an ``nn.Module`` or a configuration / data class (``PretrainedConfig``,
    ``GenerationConfig``, serfswap's report and wrappers) with ``object.__new__`` and no
    ``__setstate__`` of its own outside ``torch.nn.modules`` (whose few are reviewed
    compatibility shims). The file may only *create* it the way ``torch.save`` does
    (``__new__`` plus state, the NEWOBJ opcode), never *call* it (REDUCE), because calling
    runs ``__init__`` on the file's arguments and some model constructors load further
    models by name; or
  - an ``enum.Enum``, which a pickle calls with a member's value: a lookup of a member.
* one of a short reviewed list of **pure math functions** that models keep as attributes
  (transformers' ``GELUActivation`` stores ``torch._C._nn.gelu``) and plain data types
  (``frozenset``).

Everything else, any function or any class from elsewhere, is refused with its name before
anything is unpickled; ``trust=True`` (the CLI's ``--trust-pickle``) is the only way to the
full unpickler.

The scan of the file (:mod:`serfswap.io.pickle_scan`) must judge the bytes torch will
unpickle: the format is decided as torch decides it (a zip only when the file starts with a zip
header), so a pickle with a zip appended is refused, not scanned as the zip. The ``kernels``
package's hub-kernel wrapper is rebuilt by serfswap (``_rebuild_kernel_func`` below), never by
kernels' own function, which imports any module the file names.

Files in torch's legacy (pre-1.6, non-zip) format get the weights-only unpickler with nothing
added: state dicts load, pickled modules are refused.
"""

from __future__ import annotations

import enum
import importlib
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._legacy import PICKLED, pickled_class
from .pickle_scan import KERNEL_REBUILDERS, UnsafePickleError, scan, scan_zip

__all__ = ["UnsafePickleError", "load", "resolve"]


# Modules that may be imported to look up a class a file names. Importing one runs library
# code that loading the same model from the library would run anyway; nothing of the file's.
_MODULES = re.compile(
    r"torch\.nn\.modules\.\w+"
    r"|timm\.(layers|models)(\.\w+)*"
    r"|transformers\.models\.\w+\.(modeling|configuration)_\w+"
    r"|transformers\.(activations|pytorch_utils|modeling_utils|configuration_utils)"
    r"|transformers\.generation\.configuration_utils"
    r"|transformers\.backbone_utils"  # BackboneType, an enum DETR-like models keep
)

# Functions a model may hold as an attribute that a file may name (elementwise math, no I/O,
# no code objects, no imports) and plain data types. Reviewed one by one; extend the same way.
_MATH_FUNCTIONS: dict[str, Any] = {
    "torch._C._nn.gelu": torch._C._nn.gelu,
    "torch._C._nn.silu": torch._C._nn.silu,
    "torch._C._nn.mish": torch._C._nn.mish,
    "torch._C._nn.hardswish": torch._C._nn.hardswish,
    "torch._C._nn.hardsigmoid": torch._C._nn.hardsigmoid,
    "torch._C._nn.elu": torch._C._nn.elu,
    "torch._C._nn.leaky_relu": torch._C._nn.leaky_relu,
    "torch._C._nn.softplus": torch._C._nn.softplus,
    "torch.relu": torch.relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.nn.functional.relu": torch.nn.functional.relu,
    "torch.nn.functional.relu6": torch.nn.functional.relu6,
    "torch.nn.functional.gelu": torch.nn.functional.gelu,
    "torch.nn.functional.silu": torch.nn.functional.silu,
    "torch.nn.functional.mish": torch.nn.functional.mish,
    "torch.nn.functional.elu": torch.nn.functional.elu,
    "torch.nn.functional.selu": torch.nn.functional.selu,
    "torch.nn.functional.hardswish": torch.nn.functional.hardswish,
    "torch.nn.functional.hardsigmoid": torch.nn.functional.hardsigmoid,
    "torch.nn.functional.leaky_relu": torch.nn.functional.leaky_relu,
    "torch.nn.functional.softplus": torch.nn.functional.softplus,
    "torch.nn.functional.sigmoid": torch.nn.functional.sigmoid,
    "torch.nn.functional.tanh": torch.nn.functional.tanh,
    # A plain data type torch's own list lacks (serfswap's functional scopes hold one).
    "builtins.frozenset": frozenset,
}


# The allowlist ---------------------------------------------------------------------------------


def _data_classes() -> tuple[type, ...]:
    """The plain data classes a model may hold: serfswap's own (the report, the functional
    wrappers, FunctionInfo: every class of :data:`serfswap._legacy.PICKLED`) and transformers'
    configs."""
    classes = [cls for name in PICKLED if (cls := pickled_class(name)) is not None]
    try:
        import transformers

        classes += [transformers.PretrainedConfig, transformers.GenerationConfig]
    except ImportError:
        pass
    return tuple(classes)


def _named_class(name: str) -> Any:
    """The object ``name`` names, looked up in serfswap's table of the names it has written or
    imported from an allowed library module; UnsafePickleError for anything else."""
    ours = pickled_class(name)  # serfswap's own, under every name a release wrote (_legacy)
    if ours is not None:
        return ours
    module_name, _, attr = name.rpartition(".")
    if not _MODULES.fullmatch(module_name) or not attr.isidentifier():
        raise UnsafePickleError([name])
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UnsafePickleError([name]) from None
    obj = vars(module).get(attr)
    if not (isinstance(obj, type) and obj.__module__ == module_name and obj.__qualname__ == attr):
        raise UnsafePickleError([name])
    return obj


def resolve(name: str, *, called: bool) -> Any:
    """The object ``name`` stands for when it is allowed, else raise UnsafePickleError."""
    if name in _MATH_FUNCTIONS:
        return _MATH_FUNCTIONS[name]
    if name in KERNEL_REBUILDERS:
        return _rebuild_kernel_func
    obj = _named_class(name)
    if issubclass(obj, enum.Enum):  # pickled as a call with the value: a lookup of a member
        return obj
    if not (
        (issubclass(obj, nn.Module) or issubclass(obj, _data_classes()))
        and obj.__new__ is object.__new__
        and _reviewed_setstate(obj)
        and not called
    ):
        raise UnsafePickleError([name])
    return obj


# The hub-kernel wrapper -------------------------------------------------------------------------
#
# With the ``kernels`` package installed, transformers wraps functions such as LLaMA's
# ``apply_rotary_pos_emb`` in a small nn.Module (kernels' ``_create_func_module``) and keeps an
# instance per attention module. It pickles as a call of kernels' ``_rebuild_kernel_func(
# module_name, func_name)``, which imports *any* module the file names. serfswap never calls
# it: the file's two strings must name a wrapper that a transformers modeling module (one the
# allowlist may import anyway) defines at its top level, and only that wrapper's class is
# instantiated, with no arguments. Every other pair is refused before anything is unpickled.
_KERNEL_MODULES = re.compile(r"transformers\.models\.\w+\.modeling_\w+")


def _kernel_func_class(module_name: str, function: str) -> type[nn.Module]:
    """The class of the hub-kernel wrapper ``module_name.function`` when transformers defines
    one there, else UnsafePickleError. Imports only modules the allowlist may import."""
    name = f"{module_name}.{function}"
    if not (_KERNEL_MODULES.fullmatch(module_name) and function.isidentifier()):
        raise UnsafePickleError([f"hub kernel {name}"])
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UnsafePickleError([f"hub kernel {name}"]) from None
    wrapper = type(vars(module).get(function))
    forward = vars(wrapper).get("forward")
    if not (
        issubclass(wrapper, nn.Module)
        and wrapper.__qualname__ == "_create_func_module.<locals>.Func"
        and getattr(forward, "__module__", "").startswith("kernels.")
    ):
        raise UnsafePickleError([f"hub kernel {name}"])
    return wrapper


def _rebuild_kernel_func(module_name: str, func_name: str) -> nn.Module:
    """What kernels' ``_rebuild_kernel_func`` returns for the pairs transformers uses: a fresh
    instance of the wrapper's class (its state follows in the pickle)."""
    return _kernel_func_class(module_name, func_name)()


def _reviewed_setstate(cls: type) -> bool:
    """Whether ``cls`` has no ``__setstate__`` of its own outside ``torch.nn.modules`` (whose few
    are reviewed compatibility shims): state is then set as plain attributes."""
    setstate = getattr(cls, "__setstate__", None)
    if setstate is None or setstate is nn.Module.__setstate__:
        return True
    owner = setstate.__qualname__.split(".")[0]
    return any(
        c.__name__ == owner and c.__module__.startswith("torch.nn.modules.") for c in cls.__mro__
    )


# Loading ---------------------------------------------------------------------------------------


def _is_torch_zip(path: Path) -> bool:
    """Whether torch reads ``path`` as a zip archive: by its first four bytes, as
    ``torch.serialization._is_zipfile`` decides (Python's ``zipfile`` looks at the end)."""
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    # From an open file, not a path: torch.load reads a path ending in .safetensors as
    # safetensors, and serfswap has already told the format from the content.
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def _default_allowed() -> set[str]:
    """What torch's weights-only unpickler admits by itself (tensor rebuilders, OrderedDict...).

    Used for messages only: a name missing here is still refused by torch itself.
    """
    allowed = getattr(torch._weights_only_unpickler, "_get_allowed_globals", None)
    return set(allowed()) if allowed is not None else set()


def load(path: Path, *, trust: bool = False) -> Any:
    """``torch.load`` of ``path`` that runs no code from it unless ``trust``.

    Raises UnsafePickleError naming what the file needs beyond the allowlist. Other failures
    (corrupt files) propagate from ``torch.load``.
    """
    if trust:
        return _torch_load(path, weights_only=False)
    with warnings.catch_warnings():
        # torch warns about pickle protocols it may not parse; serfswap reports what it refuses.
        warnings.simplefilter("ignore")
        return _load_untrusted(path)


def _load_untrusted(path: Path) -> Any:
    """Scan, judge every name against the allowlist, then the weights-only unpickler with the
    allowed objects added (nothing added for torch's legacy format)."""
    default = _default_allowed()
    if not _is_torch_zip(path):  # torch's legacy format, or a bare pickle
        if zipfile.is_zipfile(path):  # a zip appended: zipfile and torch read different data
            raise UnsafePickleError(
                [], "a pickle with a zip archive appended (torch reads the pickle, a zip reader "
                "the archive): not a file torch.save writes"
            )  # fmt: skip
        with path.open("rb") as f:
            usage = scan(f)  # the first pickle; a legacy file's model follows, torch checks it
        refused = sorted(n for n in usage.names if n not in default)
        if refused:
            raise UnsafePickleError(refused)
        return _torch_load(path, weights_only=True)  # nothing added
    usage = scan_zip(path)
    allowed, refused = [], []
    for name in sorted(usage.names - default):
        try:
            allowed.append((resolve(name, called=name in usage.called), name))
        except UnsafePickleError:
            refused.append(name)
    if refused:
        raise UnsafePickleError(refused)
    for module_name, function in sorted(usage.kernel_funcs):  # the wrappers' classes, which
        wrapper = _kernel_func_class(module_name, function)  # the file builds but never names
        allowed.append((wrapper, f"serfswap.kernel_func.{module_name}.{function}"))
    with torch.serialization.safe_globals(allowed):
        return _torch_load(path, weights_only=True)
