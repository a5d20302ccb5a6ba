"""What a pickle does, read from its opcodes without running it: the globals it names and which
of them it calls (:func:`scan`), for :mod:`serfswap.io.safe_pickle` to judge before anything is
unpickled.

The scan must judge the bytes torch will unpickle, and must not be a denial of service itself:

* an archive with two members whose names are equal ignoring case (torch's lookup ignores
  case, ``zipfile``'s takes the last of equal names) is refused (:func:`scan_zip`);
* the scan streams, within ``MAX_OPCODES``, ``MAX_MEMO`` and ``MAX_PICKLE_BYTES``;
* it fails closed: a global whose name is computed, a call of anything but a named global,
  the copyreg extension registry are refused, never guessed at;
* BUILD with slot state is refused: the unpickler ``setattr``s it, running property setters
  (a config's ``num_labels`` setter builds a dict of that many labels);
* a call of the ``kernels`` package's hub-kernel rebuilder records the two literal strings it
  is called with (``PickleScan.kernel_funcs``), which the loader checks.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import first_line


class UnsafePickleError(Exception):
    """The pickle names something outside the allowlist; ``names`` lists what."""

    def __init__(self, names: list[str], detail: str = "") -> None:
        self.names = names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(detail or f"needs {shown}")


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


def _opcodes(stream: BinaryIO) -> Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]]:
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


# The hub-kernel rebuilders (see serfswap.io.safe_pickle): a call of one is recorded with the two
# names it is given, never followed further.
KERNEL_REBUILDERS = frozenset({"kernels.layer.layer._rebuild_kernel_func",
                               "kernels._internals.layer.layer._rebuild_kernel_func"})  # fmt: skip


def _kernel_args(args: Any) -> tuple[str, str]:
    """The (module, function) literal strings a wrapper is rebuilt from, as the scan saw them."""
    items = args.items if isinstance(args, _Tuple) else ()
    if len(items) != 2 or not all(isinstance(item, _Str) for item in items):
        raise UnsafePickleError([], "rebuilds a hub-kernel wrapper from computed names")
    return items[0].value, items[1].value


# The symbolic machine ----------------------------------------------------------------------------
#
# One handler per kind of opcode that moves names or calls, over one stack and memo; read as a
# table against pickletools' opcode list. Every other opcode only pops and pushes values the scan
# does not follow (_other).


@dataclass
class _Machine:
    """The scan's symbolic stack and memo, and what it has found so far."""

    result: PickleScan = field(default_factory=PickleScan)
    stack: list[Any] = field(default_factory=list)
    memo: dict[int, Any] = field(default_factory=dict)

    def call(self, obj: Any) -> None:
        """Record a call of ``obj``, which must be a named global (else fail closed)."""
        if not isinstance(obj, _Global):
            raise UnsafePickleError([], "calls an object that is not a named global")
        self.result.called.add(obj.name)

    def name(self, glob: _Global) -> _Global:
        """Record that the pickle names ``glob``."""
        self.result.names.add(glob.name)
        return glob


_Handler = Callable[[_Machine, pickletools.OpcodeInfo, Any], None]


def _global(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """GLOBAL and INST: a global named by a literal "module name" argument (INST calls it)."""
    module, _, attr = str(arg).partition(" ")
    # Python 2 names (protocol 2, torch.save's), mapped as pickle and torch map them.
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    glob = m.name(_Global(f"{module}.{attr}"))
    if op.name == "INST":
        _pop_mark(m.stack)
        m.call(glob)
        m.stack.append(None)
    else:
        m.stack.append(glob)


def _stack_global(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """STACK_GLOBAL: a global named by the two strings on the stack, which must be literals."""
    attr, module = m.stack.pop(), m.stack.pop()
    if not (isinstance(module, _Str) and isinstance(attr, _Str)):
        raise UnsafePickleError([], "a global whose name is computed")
    m.stack.append(m.name(_Global(f"{module.value}.{attr.value}")))


def _string(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """A literal string: followed, since STACK_GLOBAL and the kernel rebuilder read them."""
    m.stack.append(_Str(arg if isinstance(arg, str) else repr(arg)))


def _reduce(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """REDUCE: a call of the global below the arguments."""
    args = m.stack.pop()
    function = m.stack.pop()
    m.call(function)
    if function.name in KERNEL_REBUILDERS:
        m.result.kernel_funcs.add(_kernel_args(args))
    m.stack.append(None)


def _obj(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """OBJ: a call of the first item after the mark."""
    items = _pop_mark(m.stack)
    m.call(items[0] if items else None)
    m.stack.append(None)


def _newobj(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """NEWOBJ, NEWOBJ_EX: ``cls.__new__`` of a named class (not a call of the class)."""
    del m.stack[-(2 if op.name == "NEWOBJ" else 3) + 1 :]
    if not isinstance(m.stack[-1], _Global):
        raise UnsafePickleError([], "creates an object of a class that is not named")
    m.stack[-1] = None


def _put(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """PUT and kin: the memo keeps what is on top, names included."""
    m.memo[int(arg) if op.name != "MEMOIZE" else len(m.memo)] = m.stack[-1]


def _get(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """GET and kin: a memo entry back on the stack (None when never stored)."""
    m.stack.append(m.memo.get(int(arg)))


def _push(value: Any) -> _Handler:
    """A handler that pushes ``value`` (MARK, NONE)."""

    def push(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
        m.stack.append(value)

    return push


def _dup(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    m.stack.append(m.stack[-1])


def _extension(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """EXT1/2/4: a global from the copyreg registry, out of the scan's sight: refused."""
    raise UnsafePickleError([], "uses the copyreg extension registry")


_SMALL_TUPLES = ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")


def _tuple(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """A tuple, followed: the kernel rebuilder's arguments and BUILD's state are tuples."""
    if op.name == "TUPLE":
        m.stack.append(_Tuple(tuple(_pop_mark(m.stack))))
        return
    size = _SMALL_TUPLES.index(op.name)
    items = tuple(m.stack[len(m.stack) - size :])
    del m.stack[len(m.stack) - size :]
    m.stack.append(_Tuple(items))


def _build(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """BUILD: state for the object below, refused when it carries slot state."""
    state = m.stack.pop()
    # (state, slotstate): the unpickler *setattr*s slot state, running property
    # setters (a config's num_labels=2**31-1 builds a 2e9-entry dict). torch.save
    # writes it only for classes with __slots__, none of which the allowlist admits.
    if isinstance(state, _Tuple) and len(state.items) == 2 and state.items[1] is not _NONE:
        raise UnsafePickleError(
            [], "sets attributes through the class's setters (BUILD with slot state)"
        )


def _other(m: _Machine, op: pickletools.OpcodeInfo, arg: Any) -> None:
    """Any other opcode: pops what pickletools says it takes, pushes values not followed."""
    before = op.stack_before
    if pickletools.markobject in before:
        _pop_mark(m.stack)
        before = before[: before.index(pickletools.markobject)]
    if before:
        del m.stack[-len(before) :]
    m.stack.extend([None] * len(op.stack_after))


_HANDLERS: dict[str, _Handler] = {
    "GLOBAL": _global,
    "INST": _global,
    "STACK_GLOBAL": _stack_global,
    **dict.fromkeys(_STRINGS, _string),
    "REDUCE": _reduce,
    "OBJ": _obj,
    "NEWOBJ": _newobj,
    "NEWOBJ_EX": _newobj,
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), _put),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _get),
    "DUP": _dup,
    **dict.fromkeys(("EXT1", "EXT2", "EXT4"), _extension),
    "MARK": _push(_MARK),
    "NONE": _push(_NONE),
    **dict.fromkeys((*_SMALL_TUPLES, "TUPLE"), _tuple),
    "BUILD": _build,
}


def scan(data: bytes | BinaryIO) -> PickleScan:
    """Follow the (first) pickle's stack symbolically: which globals it names, which it calls.

    Fails closed: a global whose name is computed (not a literal string) or a call of anything
    but a named global is an error, never a guess. Streams: opcodes are followed as they are
    read, within MAX_OPCODES, MAX_MEMO and MAX_PICKLE_BYTES.
    """
    machine = _Machine()
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    for op, arg, _ in _opcodes(stream):
        if len(machine.memo) > MAX_MEMO:
            raise UnsafePickleError([], f"a pickle whose memo exceeds {MAX_MEMO} entries")
        _HANDLERS.get(op.name, _other)(machine, op, arg)
    return machine.result


def scan_zip(path: Path) -> PickleScan:
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
