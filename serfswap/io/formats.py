"""Reading weights from files without running code from them: the format of a file read from its
content (never its suffix), safetensors' header and tensors, the glue around the safe unpickler
(:mod:`serfswap.io.safe_pickle`), the state dict inside a checkpoint dict, and the strict
comparison of weights with a model's."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, first_line
from . import safe_pickle

# Where a checkpoint dict keeps its state dict, in the order looked for.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def sniff(path: Path) -> str:
    """The format of the file at ``path``, read from its first bytes and, for a zip, its names.

    One of ``safetensors``, ``pt2`` (a torch.export archive), ``torch`` (a torch.save zip),
    ``torchscript``, ``pickle`` (torch's legacy format), ``corrupt-zip`` or ``unknown``.
    """
    with path.open("rb") as f:
        head = f.read(9)
    header = int.from_bytes(head[:8], "little")  # safetensors: u64 header length, then JSON
    if len(head) == 9 and head[8:9] == b"{" and header >= 2:  # a short file: corrupt, said later
        return "safetensors"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "corrupt-zip"
        try:
            with zipfile.ZipFile(path) as archive:
                inner = {name.split("/", 1)[-1] for name in archive.namelist()}
        except (zipfile.BadZipFile, OSError):
            return "corrupt-zip"
        if "archive_format" in inner:
            return "pt2"
        if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
            return "torchscript"
        return "torch" if "data.pkl" in inner else "unknown"
    return "pickle" if head[:1] == b"\x80" else "unknown"


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a .safetensors file, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; a damaged file is a :class:`ModelLoadError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc})") from None


def unpickle(path: Path, trust_pickle: bool) -> Any:
    """A torch.save file's object; without ``trust_pickle`` nothing in it can run code.

    Trusted, the classes it names are imported as ``python`` would from the current folder
    (where a user's ``models.py`` usually is; the ``serfswap`` script's own path is elsewhere).
    """
    try:
        return _unpickle_trusted(path) if trust_pickle else safe_pickle.load(path)
    except ModelLoadError:
        raise
    except safe_pickle.UnsafePickleError as exc:
        if not exc.names:  # refused for its form: a reason, not a list of names
            raise ModelLoadError(
                f"{path}: refused before unpickling: {exc}. If you trust it, pass --trust-pickle"
            ) from None
        raise ModelLoadError(
            f"{path} is a pickle that needs {_listed(exc.names)}, which serfswap loads only by "
            "running code from the file. If you trust it, pass --trust-pickle"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({first_line(exc)})") from None
    except Exception as exc:  # pickle.UnpicklingError from the weights-only unpickler, and kin
        raise ModelLoadError(
            f"{path} cannot be loaded without running code from it ({first_line(exc)}). "
            "If you trust it, pass --trust-pickle"
        ) from None


def check_names(model: nn.Module, path: Path) -> None:
    """Refuse a module tree with a submodule, parameter or buffer name that is not an
    identifier or a number (``layers.0``). torch.fx pastes names into the source of the
    ``forward()`` it generates: a name holding a quote becomes code when the model is traced."""
    seen: set[int] = set()
    pending = [model]
    while pending:
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        tables = (vars(module).get(t) for t in ("_modules", "_parameters", "_buffers"))
        for table in tables:
            for name in table or {}:
                if not (isinstance(name, str) and (name.isidentifier() or name.isdigit())):
                    shown = repr(name)[:60]
                    raise ModelLoadError(
                        f"{path}: a {type(module).__name__} holds a member named {shown}, not "
                        "an identifier or a number; refused (names become code when traced)"
                    )
        pending.extend(m for m in (vars(module).get("_modules") or {}).values() if m is not None)


def _unpickle_trusted(path: Path) -> Any:
    """The full unpickler, with the current folder importable for the classes a file names."""
    added = "" not in sys.path and os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return safe_pickle.load(path, trust=True)
    except ModuleNotFoundError as exc:
        module = exc.name or str(exc)
        raise ModelLoadError(
            f"{path} needs the module {module!r}, which cannot be imported here: run from the "
            f"folder that holds {module.split('.')[0]}.py, or add that folder to PYTHONPATH"
        ) from None
    except AttributeError as exc:  # a class pickled from a script: __main__.Net
        raise ModelLoadError(
            f"{path} needs a class that cannot be found ({exc}); a model pickled from a script "
            "names the script's classes as __main__: save its state_dict instead"
        ) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _listed(names: list[str], most: int = 5) -> str:
    """The first ``most`` names, and how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in an unpickled object: the object itself, or the dict under one of
    :data:`_STATE_KEYS`, without DistributedDataParallel's ``module.`` prefix."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict):
        inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ModelLoadError(
                f"{path}: a dict without a state dict (looked for keys {', '.join(_STATE_KEYS)})"
            )
        return state_dict_of(inner, path)
    else:
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    prefix = "module."  # DistributedDataParallel checkpoints
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def mismatch(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]) -> str | None:
    """How two key -> shape tables differ (the first few keys of each kind), or None."""
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [k for k in own if k in given and tuple(own[k]) != tuple(given[k])]
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if shapes:
        k = shapes[0]
        parts.append(f"shape of {k}: file {tuple(given[k])}, model {tuple(own[k])}")
    return "; ".join(parts) or None


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``model``'s state-dict names and shapes (what :func:`mismatch` compares)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the first differing keys."""
    problem = mismatch(shapes_of(model), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ModelLoadError(f"{path} does not match the architecture: {problem}")
    model.load_state_dict(state)


def weights_file(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (``--weights``): safetensors or a torch.save file."""
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind in ("torch", "pickle"):
        return state_dict_of(unpickle(path, trust_pickle), path)
    raise ModelLoadError(f"{path}: not a state dict file (.safetensors or torch.save)")
