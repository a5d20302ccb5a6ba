"""The one entry point that loads MODEL as the command line names it, without running code from
files unless told to.

MODEL may be:

* ``timm:NAME``: a timm architecture (random weights, or ``weights=FILE``);
* a HuggingFace model directory (``config.json`` plus weights). Code shipped in the folder
  (``auto_map``) runs only with ``trust_remote_code=True``; transformers is never left to ask
  on stdin;
* a serfswap checkpoint (``serfswap convert`` writes it, :mod:`serfswap.io.checkpoint`): a
  ``.safetensors`` file whose metadata describes the architecture and the swap, checked field
  by field and against the weights' shapes before any model is built for real;
* a state dict, checkpoint dict or ``.safetensors`` file, with ``arch="timm:NAME"`` or
  ``arch="hf:DIR"``;
* a full pickled ``nn.Module`` (``torch.save(model)``), unpickled by torch's weights-only
  unpickler with an exact-class allowlist (:mod:`serfswap.io.safe_pickle`), or with
  ``trust_pickle=True`` by the full unpickler;
* a ``torch.export`` program (``.pt2``), only with ``trust_pickle=True``: ``torch.export.load``
  unpickles parts of the archive with the full unpickler, imports modules the archive names
  and hands its shape expressions to ``sympy.sympify``, which evaluates them.

The format is read from the content (safetensors header, zip archive, pickle), never the suffix
(:func:`serfswap.io.formats.sniff`); :data:`_LOADERS` maps each form to the function that
loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, ModelLoadError, ModelSpecError, first_line
from .architectures import (
    Loaded,
    build_arch,
    describe,
    hf_config,
    needs_remote_code,
    saved_as_causal_lm,
    seq2seq_lm_auto,
)
from .checkpoint import FORMAT, read_checkpoint
from .formats import (
    check_names,
    load_weights,
    read_safetensors,
    safetensors_header,
    sniff,
    state_dict_of,
    unpickle,
    weights_file,
)
from .hf_folder import check_folder_files, no_progress_bars
from .paths import check_input_path, check_weights_path, is_onnx, onnx_given
from .remote_code import never_ask


@dataclass(frozen=True)
class _Request:
    """What :func:`load_model` was asked besides MODEL: each loader reads what it needs."""

    spec: str
    arch: str | None
    trust_pickle: bool
    trust_remote_code: bool
    timm_kwargs: dict[str, Any] | None
    causal_lm: bool | None


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    timm_kwargs: dict[str, Any] | None = None,
    causal_lm: bool | None = None,
) -> Loaded:
    """Load MODEL as the CLI understands it (see the module docstring).

    ``causal_lm``: a HuggingFace folder saved from a causal LM (its config's ``architectures``)
    is loaded with its language-model head, so that a decoder converted or recovered here still
    generates and exports with ``--task text-generation-with-past``; ``causal_lm=False`` loads
    the bare model (``AutoModel``) instead.

    ``trust_pickle``: unpickle with the full unpickler, and load ``.pt2`` programs; both run
    code from the file. ``trust_remote_code``: let a HuggingFace folder's own code build the
    model. Without them, no file can run code, whatever it names. ``timm_kwargs``: keywords
    for ``timm.create_model`` (``num_classes``, ``in_chans``, ``drop_rate``...) of a timm
    architecture; ``num_classes`` and ``in_chans`` are otherwise read from the weights.

    >>> from serfswap.io import load_model
    >>> loaded = load_model("timm:resnet18", weights="finetuned.safetensors")  # doctest: +SKIP
    >>> loaded.model, loaded.arch  # doctest: +SKIP
    """
    if spec.startswith("timm:") and not Path(spec).exists():
        return _load_timm(spec, weights, trust_pickle, timm_kwargs)
    if timm_kwargs and not arch:
        raise ModelSpecError("--num-classes and --model-kwargs shape timm architectures only")
    path = _existing(spec)
    if is_onnx(path):
        raise ModelSpecError(onnx_given(spec))
    request = _Request(spec, arch, trust_pickle, trust_remote_code, timm_kwargs, causal_lm)
    return _LOADERS["folder" if path.is_dir() else sniff(path)](path, request)


def _load_timm(spec: str, weights: str | None, trust_pickle: bool,
               timm_kwargs: dict[str, Any] | None) -> Loaded:  # fmt: skip
    """``timm:NAME``: random (seeded) weights, or those of ``weights``, which shape it."""
    if weights is None:
        return build_arch(spec, timm_kwargs=timm_kwargs)
    wpath = check_weights_path(weights)
    state = weights_file(wpath, trust_pickle)
    loaded = build_arch(spec, state=state, timm_kwargs=timm_kwargs)
    load_weights(loaded.model, state, wpath)
    return loaded


def _load_folder(path: Path, request: _Request) -> Loaded:
    """A HuggingFace folder, by transformers' ``from_pretrained`` once its config and files
    are checked; with its language-model head when saved from a causal LM."""
    import transformers

    config = hf_config(path)
    needs_remote_code(config, request.spec, request.trust_remote_code)
    check_folder_files(path)
    with no_progress_bars():
        auto = transformers.AutoModel
        if request.causal_lm is not False and saved_as_causal_lm(config):
            auto = transformers.AutoModelForCausalLM
        elif request.causal_lm is not False and seq2seq_lm_auto(config) is not None:
            auto = seq2seq_lm_auto(config)
        model = auto.from_pretrained(
            path, attn_implementation="eager", trust_remote_code=request.trust_remote_code
        )
    return Loaded(model, request.spec, describe(model) if not request.trust_remote_code else None)


def _load_safetensors(path: Path, request: _Request) -> Loaded:
    """A serfswap checkpoint (its metadata says so), else weights for ``--arch``."""
    shapes, metadata = safetensors_header(path)
    if metadata.get("format") == FORMAT:
        model, described = read_checkpoint(path, shapes, metadata)
        return Loaded(model, str(path), described)
    return _with_arch(path, read_safetensors(path), request)


def _load_program(path: Path, request: _Request) -> Loaded:
    """A torch.export program: loading one runs code, so only when pickles are trusted."""
    if not request.trust_pickle:
        raise ModelLoadError(
            f"{path} is a torch.export program; loading one runs code from the file (pickled "
            "parts, imports it names, shape expressions that sympy evaluates). If you trust "
            "it, pass --trust-pickle"
        )
    try:
        program = torch.export.load(path)
    except Exception as exc:  # the loader raises many kinds on a damaged archive
        raise ModelLoadError(
            f"{path}: not a readable torch.export program ({first_line(exc)})"
        ) from None
    return Loaded(program, request.spec)


def _load_pickled(path: Path, request: _Request) -> Loaded:
    """A torch.save file: a whole module (its member names checked), or weights for ``--arch``."""
    obj = unpickle(path, request.trust_pickle)
    if "transformers" in sys.modules:  # a transformers model: nothing later may ask
        never_ask()
    if isinstance(obj, nn.Module):
        check_names(obj, path)
        return Loaded(obj, request.spec, describe(obj))
    return _with_arch(path, state_dict_of(obj, path), request)


def _refused(reason: str) -> Callable[[Path, _Request], Loaded]:
    """A loader for a form serfswap does not load: it says ``reason`` after the path."""

    def refuse(path: Path, request: _Request) -> Loaded:
        raise ModelLoadError(f"{path}: {reason}")

    return refuse


# Each form of MODEL (a folder, or a file's sniffed format) and the function that loads it.
_LOADERS: dict[str, Callable[[Path, _Request], Loaded]] = {
    "folder": _load_folder,
    "safetensors": _load_safetensors,
    "pt2": _load_program,
    "torch": _load_pickled,
    "pickle": _load_pickled,
    "corrupt-zip": _refused("not a readable PyTorch file (truncated or corrupt archive)"),
    "torchscript": _refused(
        "a TorchScript archive (code, not a model serfswap loads); "
        "save the module with torch.save or its weights with safetensors"
    ),
    "unknown": _refused("not a PyTorch, safetensors or torch.export file (unknown format)"),
}


def _existing(spec: str) -> Path:
    """MODEL's path, checked; a path that is not there is a mistake in MODEL (a spec error)."""
    try:
        return check_input_path(spec)
    except InvalidArgumentError as exc:
        raise ModelSpecError(str(exc)) from None


def _with_arch(path: Path, state: dict[str, torch.Tensor], request: _Request) -> Loaded:
    """Weights only: the architecture ``--arch`` names, shaped for them, with them loaded."""
    if request.arch is None:
        raise ModelSpecError(
            f"{path} holds weights only: name the architecture, --arch timm:NAME or --arch hf:DIR"
        )
    loaded = build_arch(request.arch, trust_remote_code=request.trust_remote_code, state=state,
                        timm_kwargs=request.timm_kwargs)  # fmt: skip
    load_weights(loaded.model, state, path)
    loaded.source = str(path)
    return loaded
