"""serfswap's checkpoint format: a ``.safetensors`` file of the weights whose metadata says how
to rebuild the model (``arch``: a timm name or a HuggingFace config) and how it was converted
(``swap``). :func:`save_checkpoint` writes it; :func:`load_checkpoint` reads it, checking every
metadata field and the declared sizes against the weights' shapes before any model is built
for real. Nothing in the file runs code."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import InvalidArgumentError, ModelLoadError
from ..rewrite.convert import REPORT_ATTR, convert
from .architectures import CAUSAL_LM, describe, needs_remote_code, rebuild
from .formats import mismatch, safetensors_header, shapes_of, sniff
from .paths import StrPath, check_input_path, check_output_path, staged_output
from .remote_code import refuse_remote_code, without_remote_code
from .safetensors_writer import Spec, Writer, file_order

# The ``format`` entry of a checkpoint's metadata; a .safetensors file without it holds weights.
FORMAT = "serfswap-checkpoint/1"


def save_checkpoint(
    model: nn.Module,
    path: StrPath,
    *,
    arch: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model`` as a serfswap checkpoint: its weights, with the architecture (``arch``,
    by default :func:`describe`'s) and the swap as safetensors metadata; no pickled code.
    :func:`load_checkpoint` (and ``serfswap.io.load_model``, every CLI command) reads it back.

    A tensor shared by several names (tied embeddings) is stored once, under one of them, as
    safetensors' ``save_model`` does (see :func:`tied_names`). The file is staged beside
    ``path`` and renamed over it: never half-written. ``metadata`` adds entries of the
    caller's (the demo records how it trained). ``tensors``: the weights to write in place of
    ``model``'s own. A sharded model is written by ``serfswap.recovery.fsdp.save_consolidated``,
    a tensor at a time, to the same bytes.

    >>> serfswap.save_checkpoint(serfswap.convert(model), "serf.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import _remove_duplicate_names

    entries = checkpoint_metadata(model, arch, metadata)
    state = dict(tensors) if tensors is not None else model.state_dict()
    # Ties found by storage, as save_model finds them (state_dict() detaches each name anew).
    dropped = {name: kept for kept, names in _remove_duplicate_names(state).items()
               for name in names}  # fmt: skip
    kept = {name: value for name, value in state.items() if name not in dropped}
    specs = {name: (value.dtype, tuple(value.shape)) for name, value in kept.items()}
    with checkpoint_writer(path, specs, entries, dropped) as writer:
        for name in file_order(specs):
            writer.write(name, kept[name])


def tied_names(groups: list[set[str]]) -> dict[str, str]:
    """For each group of names of one tensor, each name but the one stored -> the one stored:
    the first in sorted order, as safetensors' ``save_model`` chooses it (which also records
    the same pairs in the metadata)."""
    return {name: min(group) for group in groups for name in group if name != min(group)}


def checkpoint_metadata(
    model: nn.Module, arch: dict[str, Any] | None, metadata: dict[str, str] | None
) -> dict[str, str]:
    """A checkpoint's metadata: the caller's entries, the format, the architecture (``arch``,
    by default :func:`describe`'s) and the swap."""
    arch = arch if arch is not None else describe(model)
    if arch is None:
        raise InvalidArgumentError(
            f"cannot describe a {type(model).__name__} (neither timm nor transformers) for a "
            "checkpoint without pickled code; pass arch= or save its state_dict"
        )
    # A config that came with remote-code keys (at any depth: a pickled model's sub-config)
    # is written without them: the checkpoint rebuilds transformers' own classes only.
    arch = without_remote_code(arch)
    return {
        **(metadata or {}),
        "format": FORMAT,
        "serfswap_version": __version__,
        "arch": json.dumps(arch),
        "swap": json.dumps(conversion_options(model)),
    }


@contextlib.contextmanager
def checkpoint_writer(
    path: StrPath, specs: dict[str, Spec], entries: dict[str, str], dropped: dict[str, str]
) -> Iterator[Writer]:
    """A :class:`~serfswap.io.safetensors_writer.Writer` of the checkpoint file ``path``, for
    tensors of ``specs`` (name -> dtype, shape) and the metadata ``entries``, with the tied
    names ``dropped`` recorded as save_model records them (under the caller's entries). Each
    tensor is written as it comes, in :func:`file_order`; the file is staged and renamed into
    place once all are: never half-written."""
    with staged_output(check_output_path(path)) as staged:
        with staged.open("wb") as file:
            writer = Writer(file, specs, {**dropped, **entries})
            yield writer
            writer.finish()
        # The permissions safetensors' own writer would leave are the owner's only; give the
        # usual ones.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)


def _field(metadata: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    """The metadata entry ``key``, parsed: a JSON object, or the error says which it is not."""
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise ModelLoadError(f"{path}: serfswap checkpoint without the {key!r} field") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: field {key!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: field {key!r} is a {type(value).__name__}, not an object")
    return value


def _require(ok: bool, path: Path, field: str, expected: str) -> None:
    """Refuse the checkpoint unless ``ok``, naming the field and what it must be."""
    if not ok:
        raise ModelLoadError(f"{path}: checkpoint field {field} must be {expected}")


_TIMM_FILE_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg",
                               "pretrained_cfg_overlay", "cache_dir"})  # fmt: skip


def _checked_arch(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """The ``arch`` field, each entry checked (a file written by hand may hold anything): a
    timm name and its keywords, or a HuggingFace config of transformers' own classes."""
    arch = _field(metadata, "arch", path)
    kind = arch.get("kind")
    _require(kind in ("timm", "hf"), path, "arch.kind", '"timm" or "hf"')
    if kind == "timm":
        _require(isinstance(arch.get("name"), str), path, "arch.name", "a string")
        classes = arch.get("num_classes", 1000)
        _require(type(classes) is int and classes >= 0, path, "arch.num_classes",
                 "an integer >= 0")  # fmt: skip
        kwargs = arch.get("kwargs", {})
        _require(isinstance(kwargs, dict) and all(isinstance(v, int | float | str | bool)
                                                  for v in kwargs.values()),
                 path, "arch.kwargs", "an object of numbers, strings and booleans")  # fmt: skip
        # Keywords that make timm open or fetch other files: a checkpoint names none.
        named = sorted(_TIMM_FILE_KWARGS & kwargs.keys())
        _require(not named, path, f"arch.kwargs ({', '.join(named)})",
                 "free of keywords that name files (checkpoint_path, pretrained...)")  # fmt: skip
    else:
        config = arch.get("config")
        _require(isinstance(config, dict), path, "arch.config", "an object")
        _require(arch.get("head", CAUSAL_LM) == CAUSAL_LM, path, "arch.head",
                 f"{CAUSAL_LM!r} or absent")  # fmt: skip
        needs_remote_code(config, str(path), trust_remote_code=False)
        # serfswap never writes one (see save_checkpoint): a file that has one was not
        # written by it, and a rebuilt config would carry it into transformers.
        refuse_remote_code(config, f"{path}: checkpoint field arch.config")
    return arch


def _checked_swap(metadata: dict[str, str], path: Path) -> dict[str, list[str]]:
    """The ``swap`` field (what :func:`conversion_options` wrote), its two lists checked."""
    swap = _field(metadata, "swap", path)
    for key in ("activations", "sites"):
        value = swap.get(key)
        _require(isinstance(value, list) and all(isinstance(v, str) for v in value),
                 path, f"swap.{key}", "a list of strings")  # fmt: skip
    return swap


def _tied(model: nn.Module) -> list[set[str]]:
    """The groups of state-dict names that are one tensor (tied weights), found by identity,
    which holds on the meta device too (where storages have no address to compare)."""
    names: dict[int, set[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), set()).add(name)
    return [group for group in names.values() if len(group) > 1]


def _check_declared_sizes(arch: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                          path: Path) -> None:  # fmt: skip
    """Compare the sizes the metadata declares with the weights' shapes, building the model on
    the meta device: a checkpoint that declares 10**12 classes allocates nothing. A tied tensor
    is in the file under one of its names (see :func:`save_checkpoint`)."""
    with torch.device("meta"):
        skeleton = rebuild(arch)
    own = shapes_of(skeleton)
    for group in _tied(skeleton):
        if group & shapes.keys():
            for name in group - shapes.keys():
                del own[name]
    problem = mismatch(own, shapes)
    if problem:
        raise ModelLoadError(f"{path}: the architecture its metadata declares does not match "
                             f"its weights: {problem}")  # fmt: skip


def read_checkpoint(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a serfswap checkpoint whose header was read, and its checked ``arch``:
    every field checked and the declared sizes compared with the weights before the model is
    built, converted as the file says, then its weights loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights_into

    arch = _checked_arch(metadata, path)
    swap = _checked_swap(metadata, path)
    _check_declared_sizes(arch, shapes, path)
    model = rebuild(arch)
    sites = set(swap["sites"])
    model = convert(
        model,
        inplace=True,
        activations=swap["activations"],
        filter_fn=lambda module, name: name in sites,
    )
    try:  # strict; safetensors' loader fills every name of a tied tensor from the one stored
        load_weights_into(model, str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: not a readable serfswap checkpoint ({exc})") from None
    return model, arch


def load_checkpoint(path: StrPath) -> nn.Module:
    """The model :func:`save_checkpoint` wrote to ``path``, converted as it was, its weights
    loaded (tied weights tied again). Nothing in the file runs code: the architecture is
    rebuilt from timm or transformers by name after its metadata is checked.

    >>> model = serfswap.load_checkpoint("serf.safetensors")  # doctest: +SKIP
    """
    file = check_input_path(path)
    if file.is_dir() or sniff(file) != "safetensors":
        raise ModelLoadError(f"{path}: not a serfswap checkpoint (a .safetensors file)")
    shapes, metadata = safetensors_header(file)
    if metadata.get("format") != FORMAT:
        raise ModelLoadError(
            f"{path}: a .safetensors file without serfswap's metadata (weights only): load it "
            "with serfswap.io.load_model(..., arch=...)"
        )
    return read_checkpoint(file, shapes, metadata)[0]


def conversion_options(model: nn.Module) -> dict[str, Any]:
    """What reproduces ``model``'s swap on a fresh copy: the families and the converted sites."""
    report = model.__dict__.get(REPORT_ATTR)
    converted = report.converted if report is not None else []
    return {
        "activations": sorted({s.family for s in converted}),
        "sites": [s.name for s in converted],
    }
