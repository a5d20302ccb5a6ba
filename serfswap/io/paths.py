"""Checks on the files a command reads and writes, made before any work and any write, and the
staged write that puts an output in place only once it is whole.

Low in the layering (it imports only the errors), so that io, export and the CLI share one
answer to "may this path be read", "may this path be written" and "how is it written".
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InvalidArgumentError

# The entries of a checkpoint folder that a run writes, replaces and removes (trainstate's).
_CHECKPOINT_ENTRY = re.compile(r"step-\d{8}|\.tmp-step-.*")
StrPath = str | os.PathLike[str]


def check_input_path(spec: StrPath) -> Path:
    """``spec`` as a Path when it is an existing directory or regular file.

    Devices, FIFOs and sockets are refused before anything reads them (``/dev/zero`` never ends,
    a FIFO blocks). Links are followed, so a link to a device is refused too.
    """
    path = Path(spec)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgumentError(f"{spec}: no such file or directory") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{spec}: cannot be read ({exc.strerror})") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise InvalidArgumentError(f"{spec}: not a regular file or directory; refused unread")
    return path


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_output_path(spec: StrPath, inputs: Iterable[StrPath | None] = ()) -> Path:
    """``spec`` as a Path when a file can be written there without destroying an input.

    Refused: a name ending in a separator or naming a directory (``-o newdir/`` is never a
    file called ``newdir``), a missing or read-only directory, the path of an input or a link
    to it, and an existing file inside an input directory (a model folder's own weights).
    """
    text = os.fspath(spec)
    path = Path(text)
    if text.endswith((os.sep, "/")) or path.is_dir():
        raise InvalidArgumentError(f"{text} is a directory; give a file name")
    _check_writable_parent(path)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if _same(path, source):
            raise InvalidArgumentError(f"{text} is the input {given}; write somewhere else")
        if source.is_dir() and path.exists() and source.resolve() in path.resolve().parents:
            raise InvalidArgumentError(
                f"{text} would overwrite a file of the input folder {given}; write somewhere else"
            )
    return path


def check_output_dir(spec: StrPath, inputs: Iterable[StrPath | None] = ()) -> Path:
    """``spec`` as a Path when recovery checkpoints may be written there: not a file, not an
    input folder or a link to one, and not holding an input inside one of the ``step-*``
    folders a run replaces and removes. A new folder inside an input folder is allowed, as a
    new ``-o`` file is (a model folder's own ``runs/``)."""
    text = os.fspath(spec)
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"{text} is a file; give a folder for the checkpoints")
    target = path.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or (path.exists() and _same(path, Path(given))):
            raise InvalidArgumentError(f"{text} is the input {given}; write somewhere else")
        if target in source.parents and _CHECKPOINT_ENTRY.match(
            source.relative_to(target).parts[0]
        ):
            raise InvalidArgumentError(
                f"{text} holds the input {given} in a checkpoint folder, which a run replaces "
                "or removes; write somewhere else"
            )
    return path


def check_distinct_outputs(paths: Iterable[StrPath | None]) -> None:
    """Refuse two outputs of one command that are one file (``--log`` equal to ``-o``):
    the later write would destroy the earlier."""
    seen: dict[Path, str] = {}
    for spec in paths:
        if spec is None:
            continue
        key = Path(spec).resolve()
        if key in seen:
            raise InvalidArgumentError(f"{spec} and {seen[key]} are one file; give two names")
        seen[key] = os.fspath(spec)


@contextlib.contextmanager
def staged_output(path: Path, *, side_file: str | None = None) -> Iterator[Path]:
    """A path to write ``path``'s file (and any side file beside it) in a fresh folder next to
    the target; on success every file in it moves into place (:func:`_move_into_place`), on
    failure none does. The folder is on the target's filesystem, so the moves are atomic renames.

    ``side_file``: the name of the side file the output may have (an ONNX file's weights,
    ``<name>.data``); one that an earlier output left beside the target is removed when the new
    output has none, so that no stale weights stay next to a file that does not read them."""
    # The name is chosen before the folder exists, so that a Ctrl-C or SIGTERM at any bytecode
    # (inside mkdtemp's Python code, after its mkdir, was one: 1 run in 10 under load) finds it
    # in the finally. A short name of its own: any legal name of the target stays legal inside.
    staging: Path | None = path.parent / f".serfswap-{secrets.token_hex(8)}"
    try:
        try:
            os.mkdir(staging, 0o700)
        except FileExistsError:  # not ours (64 random bits: never in practice)
            staging = None
            raise
        yield staging / path.name
        _move_into_place(staging, path, side_file)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, path: Path, side_file: str | None) -> None:
    """Every file of ``staging`` beside ``path``, ``path`` itself last (its side file is in
    place before the file that reads it), and a stale ``side_file`` removed; SIGINT and SIGTERM
    are held back meanwhile, so that an interrupt lands before or after the renames, never
    between two of them (a new ONNX file beside the old weights)."""
    held = hasattr(signal, "pthread_sigmask")  # POSIX
    if held:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        staged = sorted(staging.iterdir(), key=lambda f: f.name == path.name)
        for staged_file in staged:
            os.replace(staged_file, path.parent / staged_file.name)
        if side_file is not None and all(f.name != side_file for f in staged):
            (path.parent / side_file).unlink(missing_ok=True)
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


# What a file is, from its first bytes: enough to say "that is an ONNX file" or "that is an
# image" where a command expects something else, before any heavy import.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_ONNX_FIELDS = frozenset(range(0x12, 0x5B, 8))  # protobuf tags of ModelProto's fields 2 to 11


def _head(path: Path, size: int = 16) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX model file: its suffix, or a protobuf ModelProto's start
    (field 1 ``ir_version``, a small varint, then another of its fields)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".onnx":
        return True
    head = _head(path, 3)
    return len(head) == 3 and head[0] == 0x08 and 1 <= head[1] <= 32 and head[2] in _ONNX_FIELDS


def is_image(path: Path) -> bool:
    """Whether ``path`` is an image file (PNG, JPEG, GIF, BMP, TIFF, WebP), from its bytes."""
    head = _head(path)
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def onnx_given(spec: StrPath) -> str:
    """What to say when an ONNX file is given where a PyTorch model is read."""
    return (
        f"{spec} is an ONNX file: serfswap reads the PyTorch model (timm, transformers, a "
        "torch.nn module; its activations are modules to replace) and writes ONNX; convert "
        "the model the file was exported from (`serfswap export MODEL OUT.onnx --convert` "
        "converts and exports in one go)"
    )


def check_weights_path(spec: StrPath) -> Path:
    """``spec`` as a Path when it is a weights file (not a folder: a HuggingFace model folder
    is MODEL itself, a state dict is one file)."""
    path = check_input_path(spec)
    if path.is_dir():
        folder = (
            " (a HuggingFace model folder: give it as MODEL)"
            if (path / "config.json").is_file()
            else ""
        )
        raise InvalidArgumentError(
            f"--weights {spec} is a directory{folder}; give the weights file "
            "(.safetensors, or a state dict saved with torch.save)"
        )
    if is_onnx(path):
        raise InvalidArgumentError(onnx_given(spec))
    return path


def wants_folder(spec: StrPath) -> bool:
    """Whether an output names a folder: it ends with a separator or is an existing folder."""
    text = os.fspath(spec)
    return text.endswith((os.sep, "/")) or Path(text).is_dir()


def _check_writable_parent(path: Path) -> None:
    """The folder an output goes in exists and can be written."""
    directory = path.parent
    if not directory.is_dir():
        raise InvalidArgumentError(f"output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise InvalidArgumentError(f"output directory {directory} is not writable")


def check_output_folder(spec: StrPath, inputs: Iterable[StrPath | None] = ()) -> Path:
    """``spec`` as a Path when a folder can be written there: new, or an empty folder (a
    model folder's files are never overwritten or mixed with others), in a writable place,
    and not one of the inputs."""
    path = Path(os.fspath(spec).rstrip("/" + os.sep) or os.sep)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidArgumentError(f"{spec} is not an empty folder; give a new or empty one")
    _check_writable_parent(path)
    for given in inputs:
        if given is not None and _same(path, Path(given)):
            raise InvalidArgumentError(f"{spec} is the input {given}; write somewhere else")
    return path
