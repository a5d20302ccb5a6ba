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

The scan must judge the bytes torch will unpickle, and must not be a denial of service itself:

* the format is decided as torch decides it (a zip only when the file starts with a zip
  header), so a pickle with a zip appended is refused, not scanned as the zip; an archive with
  two members whose names are equal ignoring case (torch's lookup ignores case, ``zipfile``'s
  takes the last of equal names) is refused;
* the scan streams, within ``MAX_OPCODES``, ``MAX_MEMO`` and ``MAX_PICKLE_BYTES``;
* BUILD with slot state is refused: the unpickler ``setattr``s it, running property setters
  (a config's ``num_labels`` setter builds a dict of that many labels);
* the ``kernels`` package's hub-kernel wrapper is rebuilt by serfswap (``_rebuild_kernel_func``
  below), never by kernels' own function, which imports any module the file names.

Files in torch's legacy (pre-1.6, non-zip) format get the weights-only unpickler with nothing
added: state dicts load, pickled modules are refused.
"""

from __future__ import annotations

import _compat_pickle
import enum
import importlib
import io
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .._legacy import PICKLED, pickled_class
from ..errors import first_line

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


class UnsafePickleError(Exception):
    """The pickle names something outside the allowlist; ``names`` lists what."""

    def __init__(self, names: list[str], detail: str = "") -> None:
        self.names = names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(detail or f"needs {shown}")


# What a pickle does, read from its opcodes without running it ---------------------------------


@dataclass
class PickleScan:
    """The globals a pickle names, and which of them it calls (REDUCE, INST, OBJ)."""

    names: set[str] = field(default_factory=set)
    called: set[str] = field(default_factory=set)
    # (module, function) pairs a hub-kernel wrapper is rebuilt from (see _KERNEL_REBUILDERS)
    kernel_funcs: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Str:
    value: str


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]


_MARK = object()
_NONE = object()  # the pickle's None, told apart from values the scan does not follow
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
            "STRING", "BINSTRING", "SHORT_BINSTRING"}  # fmt: skip


def _pop_mark(stack: list[Any]) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise UnsafePickleError([], "malformed pickle (no MARK)")


# Bounds of the scan. A model's pickle holds a few hundred opcodes per module and its tensors'
# bytes live elsewhere (a torch.save archive's data/ records): a pickled 7B LLaMA is well under
# 100 000 opcodes and a few MB. Past these, the file is refused without reading further: a
# 21 KB archive can deflate to tens of MB of opcodes, and each costs time and memory to follow.
MAX_OPCODES = 2_000_000
MAX_MEMO = 500_000
MAX_PICKLE_BYTES = 256 * 2**20


class _Bounded(io.RawIOBase):
    """A read-only view of ``stream`` that refuses to go past ``limit`` bytes, checked before
    each read: an opcode that declares a 2**60-byte string is refused, never allocated."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._left = limit
        self._position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # genops reports positions; a zip member cannot seek
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise UnsafePickleError(
                [], f"a pickle over {MAX_PICKLE_BYTES >> 20} MiB (a model's is a few MB)"
            )
        data = self._stream.read(size)
        self._left -= len(data)
        self._position += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        line = self._stream.readline(min(self._left, 2**16))
        self._left -= len(line)
        self._position += len(line)
        return line


def _opcodes(stream: BinaryIO) -> Any:
    """pickletools' opcodes of the first pickle in ``stream``, read lazily and bounded."""
    count = 0
    try:
        for item in pickletools.genops(_Bounded(stream, MAX_PICKLE_BYTES)):
            count += 1
            if count > MAX_OPCODES:
                raise UnsafePickleError(
                    [], f"a pickle of more than {MAX_OPCODES} opcodes (a model's has far fewer)"
                )
            yield item
    except UnsafePickleError:
        raise
    except Exception as exc:  # genops raises ValueError and others on malformed input
        raise UnsafePickleError([], f"malformed pickle ({first_line(exc)})") from None


def scan(data: bytes | BinaryIO) -> PickleScan:
    """Follow the (first) pickle's stack symbolically: which globals it names, which it calls.

    Fails closed: a global whose name is computed (not a literal string) or a call of anything
    but a named global is an error, never a guess. Streams: opcodes are followed as they are
    read, within MAX_OPCODES, MAX_MEMO and MAX_PICKLE_BYTES.
    """
    # Long: one branch per kind of opcode that moves names or calls, over one stack and memo.
    # Read as a table against pickletools' opcode list; split, every piece would share them.
    result = PickleScan()
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def called(obj: Any) -> None:
        if not isinstance(obj, _Global):
            raise UnsafePickleError([], "calls an object that is not a named global")
        result.called.add(obj.name)

    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    for op, arg, _ in _opcodes(stream):
        if len(memo) > MAX_MEMO:
            raise UnsafePickleError([], f"a pickle whose memo exceeds {MAX_MEMO} entries")
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            # Python 2 names (protocol 2, torch.save's), mapped as pickle and torch map them.
            if (module, attr) in _compat_pickle.NAME_MAPPING:
                module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            glob = _Global(f"{module}.{attr}")
            result.names.add(glob.name)
            if name == "INST":
                _pop_mark(stack)
                called(glob)
                stack.append(None)
            else:
                stack.append(glob)
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                raise UnsafePickleError([], "a global whose name is computed")
            glob = _Global(f"{module.value}.{attr.value}")
            result.names.add(glob.name)
            stack.append(glob)
        elif name in _STRINGS:
            stack.append(_Str(arg if isinstance(arg, str) else repr(arg)))
        elif name == "REDUCE":
            args = stack.pop()
            function = stack.pop()
            called(function)
            if function.name in _KERNEL_REBUILDERS:
                result.kernel_funcs.add(_kernel_args(args))
            stack.append(None)
        elif name == "OBJ":
            items = _pop_mark(stack)
            called(items[0] if items else None)
            stack.append(None)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            del stack[-(2 if name == "NEWOBJ" else 3) + 1 :]
            if not isinstance(stack[-1], _Global):
                raise UnsafePickleError([], "creates an object of a class that is not named")
            stack[-1] = None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg)))
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise UnsafePickleError([], "uses the copyreg extension registry")
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "NONE":
            stack.append(_NONE)
        elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            size = ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3").index(name)
            items = tuple(stack[len(stack) - size :])
            del stack[len(stack) - size :]
            stack.append(_Tuple(items))
        elif name == "TUPLE":
            stack.append(_Tuple(tuple(_pop_mark(stack))))
        elif name == "BUILD":
            state = stack.pop()
            # (state, slotstate): the unpickler *setattr*s slot state, running property
            # setters (a config's num_labels=2**31-1 builds a 2e9-entry dict). torch.save
            # writes it only for classes with __slots__, none of which the allowlist admits.
            if isinstance(state, _Tuple) and len(state.items) == 2 and state.items[1] is not _NONE:
                raise UnsafePickleError(
                    [], "sets attributes through the class's setters (BUILD with slot state)"
                )
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                _pop_mark(stack)
                before = before[: before.index(pickletools.markobject)]
            if before:
                del stack[-len(before) :]
            stack.extend([None] * len(op.stack_after))
    return result


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
    if name in _KERNEL_REBUILDERS:
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
_KERNEL_REBUILDERS = frozenset({"kernels.layer.layer._rebuild_kernel_func",
                                "kernels._internals.layer.layer._rebuild_kernel_func"})  # fmt: skip
_KERNEL_MODULES = re.compile(r"transformers\.models\.\w+\.modeling_\w+")


def _kernel_args(args: Any) -> tuple[str, str]:
    """The (module, function) literal strings a wrapper is rebuilt from, as the scan saw them."""
    items = args.items if isinstance(args, _Tuple) else ()
    if len(items) != 2 or not all(isinstance(item, _Str) for item in items):
        raise UnsafePickleError([], "rebuilds a hub-kernel wrapper from computed names")
    return items[0].value, items[1].value


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


def _scan_zip(path: Path) -> PickleScan:
    """The scan of the ``data.pkl`` of a ``torch.save`` archive (one top-level folder, as torch
    writes), streamed from the archive.

    The scan must see the record torch will unpickle. torch's reader (miniz) finds a name
    ignoring case and takes the first of equal names; Python's ``zipfile`` takes the last. An
    archive with two members whose names are equal ignoring case has two readings: refused.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        folded: set[str] = set()
        for name in names:
            if name.casefold() in folded:
                raise UnsafePickleError(
                    [], f"an archive with two members named {name!r} (ignoring case): torch and "
                    "a scan would read different ones"
                )  # fmt: skip
            folded.add(name.casefold())
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1:
            raise UnsafePickleError([], "not a torch.save archive (several top-level folders)")
        try:
            member = archive.open(f"{tops.pop()}/data.pkl")
        except KeyError:
            raise UnsafePickleError([], "not a torch.save archive (no data.pkl)") from None
        with member:
            return scan(member)


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
    usage = _scan_zip(path)
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
