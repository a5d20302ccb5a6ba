"""Loading models for the command line without running code from them, and serfswap's checkpoints.

MODEL may be:

* ``timm:NAME``: a timm architecture (random weights, or ``weights=FILE``);
* a HuggingFace model directory (``config.json`` plus weights). Code shipped in the folder
  (``auto_map``) runs only with ``trust_remote_code=True``; transformers is never left to ask
  on stdin;
* a serfswap checkpoint (``serfswap convert`` writes it): a ``.safetensors`` file whose metadata
  describes the architecture and the swap, checked field by field and against the weights'
  shapes before any model is built for real;
* a state dict, checkpoint dict or ``.safetensors`` file, with ``arch="timm:NAME"`` or
  ``arch="hf:DIR"``;
* a full pickled ``nn.Module`` (``torch.save(model)``), unpickled by torch's weights-only
  unpickler with an exact-class allowlist (:mod:`serfswap.safe_pickle`), or with
  ``trust_pickle=True`` by the full unpickler;
* a ``torch.export`` program (``.pt2``), only with ``trust_pickle=True``: ``torch.export.load``
  unpickles parts of the archive with the full unpickler, imports modules the archive names
  and hands its shape expressions to ``sympy.sympify``, which evaluates them.

The format is read from the content (safetensors header, zip archive, pickle), never the suffix.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import InvalidArgumentError, ModelLoadError, ModelSpecError
from ..rewrite.configs import config_before
from ..rewrite.convert import REPORT_ATTR, convert
from . import safe_pickle
from .paths import (
    StrPath,
    check_input_path,
    check_output_folder,
    check_output_path,
    check_weights_path,
    is_onnx,
    onnx_given,
    staged_output,
)
from .remote_code import never_ask, refuse_remote_code, without_remote_code

FORMAT = "serfswap-checkpoint/1"
# arch["head"] of a checkpoint of a transformers model with its language-model head; absent for
# the bare model (AutoModel), as in every checkpoint written before the field existed.
CAUSAL_LM = "causal-lm"
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


@dataclass
class Loaded:
    """A loaded model and what is known of how to rebuild it (for ``serfswap convert``)."""

    model: nn.Module | torch.export.ExportedProgram
    source: str
    arch: dict[str, Any] | None = (
        None  # {"kind": "timm", "name": ..., ...} or {"kind": "hf", "config": {...}}
    )
    notes: list[str] = field(default_factory=list)  # worth one line to the user


# Architectures -------------------------------------------------------------------------------


def _timm(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with seeded random weights: two runs on ``timm:NAME`` agree."""
    import timm

    if not timm.is_model(name):
        raise ModelSpecError(f"unknown timm architecture {name!r} (see timm.list_models())")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:  # a keyword the architecture does not take
            raise ModelSpecError(f"timm {name}: {exc} (check --model-kwargs)") from None


def _listify(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _timm_shapes(
    name: str, state: dict[str, torch.Tensor], given: dict[str, Any]
) -> dict[str, Any]:
    """The keywords that shape timm's ``name`` like the weights in ``state``: ``num_classes``
    from the classifier's weight (0 when the weights have no classifier), ``in_chans`` from
    the first convolution's, unless ``given`` sets them. A fine-tuned head loads as it is."""
    with torch.device("meta"):  # the default model, for its config only: allocates nothing
        cfg = _timm(name, **given).pretrained_cfg
    shapes = dict(given)
    heads = _listify(cfg.get("classifier"))
    if "num_classes" not in given and heads:
        weights = [state[f"{h}.weight"] for h in heads if f"{h}.weight" in state]
        if weights:
            shapes["num_classes"] = int(weights[0].shape[0])
        elif not any(k.startswith(f"{h}.") for h in heads for k in state):
            shapes["num_classes"] = 0  # features only
    convs = [state.get(f"{c}.weight") for c in _listify(cfg.get("first_conv"))]
    if "in_chans" not in given and convs and convs[0] is not None and convs[0].dim() == 4:
        shapes["in_chans"] = int(convs[0].shape[1])
    return shapes


def timm_arch(name: str, state: dict[str, torch.Tensor] | None = None,
              **given: Any) -> Loaded:  # fmt: skip
    """timm's ``name`` shaped for ``state`` (see :func:`_timm_shapes`), its weights loaded.
    Without ``state`` its weights are random (seeded) and :attr:`Loaded.notes` says so."""
    kwargs = _timm_shapes(name, state, given) if state is not None else dict(given)
    model = _timm(name, **kwargs)
    extra = {k: v for k, v in kwargs.items() if k != "num_classes"}
    arch = {"kind": "timm", "name": name, "num_classes": model.num_classes,
            **({"kwargs": extra} if extra else {})}  # fmt: skip
    loaded = Loaded(model, f"timm:{name}", arch)
    # Read from the weights and unlike the architecture's default (a fine-tuned head, a
    # grayscale stem): said, since nothing else shows the user what shape was built.
    cfg = model.pretrained_cfg
    defaults = {
        "num_classes": cfg.get("num_classes", 1000),
        "in_chans": cfg.get("input_size", (3,))[0],
    }
    inferred = {
        k: v for k, v in kwargs.items() if k in defaults and k not in given and v != defaults[k]
    }
    if inferred:
        loaded.notes.append(
            f"timm:{name} shaped like its weights: "
            + ", ".join(f"{k}={v}" for k, v in sorted(inferred.items()))
            + " (--num-classes / --model-kwargs set them)"
        )
    if state is None:
        loaded.notes.append(
            f"timm:{name} has random weights here (seeded, so runs agree); "
            "pass --weights FILE for trained ones"
        )
    return loaded


def _hf_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a HuggingFace model directory, checked to be an object."""
    if not directory.is_dir():
        raise ModelSpecError(f"{directory} is not a directory")
    file = directory / "config.json"
    if not file.is_file():
        raise ModelSpecError(f"{directory} has no config.json: not a HuggingFace model directory")
    check_input_path(file)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file}: a JSON {type(config).__name__}, not an object")
    return config


# Index files of sharded weights: their weight_map names the files transformers opens.
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_folder_files(directory: Path) -> None:
    """Every file transformers may open in a model folder is a regular file, checked before
    it opens any: the folder's entries (links followed: a hub cache's point at its blobs), and
    every shard an index names, which must also be a plain name inside the folder. A FIFO
    would block ``open`` in native code, where neither Ctrl-C nor SIGTERM reaches Python."""
    for entry in sorted(directory.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: transformers reports a missing file itself
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelLoadError(f"{entry}: not a regular file (a FIFO, device or socket)")
    for name in _INDEXES:
        index = directory / name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a JSON object with a weight_map ({exc})") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: weight_map is not an object")
        for shard in sorted(set(map(str, weight_map.values()))):
            parts = PurePosixPath(shard).parts
            if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
                raise ModelLoadError(f"{index} names {shard!r}, not a file inside the folder")
            check = directory.joinpath(*parts)
            try:
                regular = stat.S_ISREG(check.stat().st_mode)
            except OSError:
                raise ModelLoadError(f"{index} names {shard!r}, which is missing") from None
            if not regular:
                raise ModelLoadError(f"{index} names {shard!r}, which is not a regular file")


def _needs_remote_code(config: dict[str, Any], where: str, trust_remote_code: bool) -> bool:
    """Whether only code shipped with the model can build it; refused unless trusted.

    Untrusted, a remote-code key anywhere below the top level (a sub-config such as DETR's
    ``backbone_config``, a list of configs) is refused: transformers loads sub-configs without
    the caller's ``trust_remote_code`` and would ask on stdin. A top-level ``auto_map`` of a
    type transformers knows is ignored, since serfswap passes ``trust_remote_code=False``.
    """
    from transformers import CONFIG_MAPPING

    never_ask()
    if not trust_remote_code:
        refuse_remote_code(config, where, skip_top=frozenset({"auto_map"}))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{where}: the config names no model_type (a string)")
    if model_type in CONFIG_MAPPING:
        return False  # transformers' own class; an auto_map is ignored without trust
    if "auto_map" not in config:
        raise ModelLoadError(f"{where}: transformers knows no model_type {model_type!r}")
    if not trust_remote_code:
        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is defined by code in the model's folder "
            "(auto_map); loading it runs that code. If you trust it, pass --trust-remote-code"
        )
    return True


def _hf_from_config(config_dict: dict[str, Any], *, causal_lm: bool = False) -> nn.Module:
    """A transformers model of a registered type from a config dict (random weights); with
    ``causal_lm``, the model with its language-model head (``AutoModelForCausalLM``)."""
    import transformers

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        return auto.from_config(config, attn_implementation="eager", trust_remote_code=False)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(
            f"the {model_type} config cannot build a model: {_first_line(exc)}"
        ) from None


def build_arch(
    arch: str,
    *,
    trust_remote_code: bool = False,
    state: dict[str, torch.Tensor] | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Loaded:
    """``timm:NAME`` (shaped for ``state`` when given) or ``hf:DIR`` (the directory's config
    only), with random weights."""
    kind, _, name = arch.partition(":")
    if kind == "timm" and name:
        return timm_arch(name, state, **(timm_kwargs or {}))
    if timm_kwargs:
        raise ModelSpecError("--num-classes and --model-kwargs shape timm architectures only")
    if kind == "hf" and name:
        directory = Path(name)
        config = _hf_config(directory)
        if _needs_remote_code(config, name, trust_remote_code):
            import transformers

            remote = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
            model = transformers.AutoModel.from_config(remote, trust_remote_code=True)
            return Loaded(model, arch, None)  # its code is not in a checkpoint: not describable
        lm = _keeps_lm_head(config, state)
        if state is not None:  # compare on the meta device first: a huge vocab_size allocates
            _compare_on_meta(config, state, name, causal_lm=lm)  # nothing before it is refused
        head = {"head": CAUSAL_LM} if lm else {}
        return Loaded(_hf_from_config(config, causal_lm=lm), arch,
                      {"kind": "hf", "config": config, **head})  # fmt: skip
    raise ModelSpecError(f"--arch {arch!r}: use timm:NAME or hf:DIR")


def _compare_on_meta(
    config: dict[str, Any], state: dict[str, torch.Tensor], where: str, *, causal_lm: bool
) -> None:
    """Refuse weights whose names or shapes differ from the model ``config`` describes (with
    its LM head when ``causal_lm``), built on the meta device (sizes only, no memory)."""
    with torch.device("meta"):
        skeleton = _hf_from_config(config, causal_lm=causal_lm)
    problem = _mismatch(_shapes(skeleton), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ModelLoadError(f"the weights do not match the architecture in {where}: {problem}")


def _rebuild(arch: dict[str, Any]) -> nn.Module:
    """The model a checked ``arch`` (see :func:`_checked_arch`) describes, with random weights."""
    if arch["kind"] == "timm":
        return _timm(arch["name"], num_classes=arch.get("num_classes", 1000),
                     **arch.get("kwargs", {}))  # fmt: skip
    return _hf_from_config(arch["config"], causal_lm=arch.get("head") == CAUSAL_LM)


def describe(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model`` without pickles: a timm name, or a HuggingFace config."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return {"kind": "timm", "name": cfg["architecture"], "num_classes": model.num_classes}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # The config before convert() said "serf" in it: the checkpoint's swap redoes that.
        config_dict = config_before(config, model.__dict__.get(REPORT_ATTR))
        kind = type(model)
        lm = kind.__module__.startswith("transformers.") and kind.__name__ in _causal_lm_classes()
        head = {"head": CAUSAL_LM} if lm else {}
        return {"kind": "hf", "config": config_dict, **head}
    return None


# Formats -------------------------------------------------------------------------------------


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


# Weights -------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a .safetensors file, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc})") from None


def _unpickle(path: Path, trust_pickle: bool) -> Any:
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
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({_first_line(exc)})") from None
    except Exception as exc:  # pickle.UnpicklingError from the weights-only unpickler, and kin
        raise ModelLoadError(
            f"{path} cannot be loaded without running code from it ({_first_line(exc)}). "
            "If you trust it, pass --trust-pickle"
        ) from None


def _check_names(model: nn.Module, path: Path) -> None:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickle_trusted(path: Path) -> Any:
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
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict):
        inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ModelLoadError(
                f"{path}: a dict without a state dict (looked for keys {', '.join(_STATE_KEYS)})"
            )
        return _state_dict(inner, path)
    else:
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    prefix = "module."  # DistributedDataParallel checkpoints
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]) -> str | None:
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


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the first differing keys."""
    problem = _mismatch(_shapes(model), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ModelLoadError(f"{path} does not match the architecture: {problem}")
    model.load_state_dict(state)


# HuggingFace folders -------------------------------------------------------------------------

# Files of a model folder that save_pretrained writes anew (weights, their index, the config):
# never copied from the original folder. Everything else (tokenizer, sentence-transformers'
# modules.json and 1_Pooling/...) is the model's company and is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")


def save_hf_folder(
    model: nn.Module, folder: StrPath, *, files_from: StrPath | None = None
) -> list[str]:
    """Write a converted transformers model as a HuggingFace folder (``save_pretrained``: its
    config says "serf" where the activations were converted, so ``from_pretrained`` after
    ``import serfswap`` rebuilds it), with the other files of ``files_from`` (the original
    folder: tokenizer, sentence-transformers modules) copied beside it. The folder is written
    in a staging folder and moved into place whole. Returns the names copied.
    """
    import shutil

    if not callable(getattr(model, "save_pretrained", None)):
        raise InvalidArgumentError(
            f"a HuggingFace folder needs a transformers model, not a {type(model).__name__}; "
            "write a serfswap checkpoint (a .safetensors file) instead"
        )
    source = check_input_path(files_from) if files_from is not None else None
    if source is not None and not source.is_dir():
        raise InvalidArgumentError(f"--files-from {files_from}: not a folder")
    copied = []
    with staged_output(check_output_folder(folder)) as staged:
        with _no_progress_bars():
            model.save_pretrained(staged)
        for entry in sorted(source.iterdir()) if source is not None else []:
            name = entry.name
            weights = name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")
            card = name == "README.md"  # the original's model card: not this model's
            if name.startswith(".") or weights or card or (staged / name).exists():
                continue
            if entry.is_dir():
                shutil.copytree(entry, staged / name)
            else:
                shutil.copy2(entry, staged / name)
            copied.append(name)
    return copied


# Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    model: nn.Module,
    path: StrPath,
    *,
    arch: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model`` as a serfswap checkpoint: its weights, with the architecture (``arch``,
    by default :func:`describe`'s) and the swap as safetensors metadata; no pickled code.
    :func:`load_checkpoint` (and ``serfswap.io.load_model``, every CLI command) reads it back.

    Written with safetensors' ``save_model``, which stores a tensor shared by several names
    (tied embeddings) once, under one of them. The file is staged beside ``path`` and renamed
    over it: never half-written. ``metadata`` adds entries of the caller's (the demo records
    how it trained).

    >>> serfswap.save_checkpoint(serfswap.convert(model), "serf.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_model

    arch = arch if arch is not None else describe(model)
    if arch is None:
        raise InvalidArgumentError(
            f"cannot describe a {type(model).__name__} (neither timm nor transformers) for a "
            "checkpoint without pickled code; pass arch= or save its state_dict"
        )
    # A config that came with remote-code keys (at any depth: a pickled model's sub-config)
    # is written without them: the checkpoint rebuilds transformers' own classes only.
    arch = without_remote_code(arch)
    entries = {
        **(metadata or {}),
        "format": FORMAT,
        "serfswap_version": __version__,
        "arch": json.dumps(arch),
        "swap": json.dumps(conversion_options(model)),
    }
    with staged_output(check_output_path(path)) as staged:
        save_model(model, str(staged), metadata=entries)
        _canonical_header(staged)
        # safetensors creates files readable by their owner only; give the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors header with its keys sorted: safetensors writes metadata in the
    order of a randomly seeded hash map, so the same checkpoint would differ byte for byte
    between runs. Same entries, same length: the tensor data does not move."""
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        encoded = text.encode()
        if len(encoded) <= size:  # always, for a permutation; else leave the file as written
            f.seek(8)
            f.write(encoded.ljust(size, b" "))


def _field(metadata: dict[str, str], key: str, path: Path) -> dict[str, Any]:
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
    if not ok:
        raise ModelLoadError(f"{path}: checkpoint field {field} must be {expected}")


_TIMM_FILE_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg",
                               "pretrained_cfg_overlay", "cache_dir"})  # fmt: skip


def _checked_arch(metadata: dict[str, str], path: Path) -> dict[str, Any]:
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
        _needs_remote_code(config, str(path), trust_remote_code=False)
        # serfswap never writes one (see save_checkpoint): a file that has one was not
        # written by it, and a rebuilt config would carry it into transformers.
        refuse_remote_code(config, f"{path}: checkpoint field arch.config")
    return arch


def _checked_swap(metadata: dict[str, str], path: Path) -> dict[str, list[str]]:
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
        skeleton = _rebuild(arch)
    own = _shapes(skeleton)
    for group in _tied(skeleton):
        if group & shapes.keys():
            for name in group - shapes.keys():
                del own[name]
    problem = _mismatch(own, shapes)
    if problem:
        raise ModelLoadError(f"{path}: the architecture its metadata declares does not match "
                             f"its weights: {problem}")  # fmt: skip


def _read_checkpoint(
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
    model = _rebuild(arch)
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
    shapes, metadata = _safetensors_header(file)
    if metadata.get("format") != FORMAT:
        raise ModelLoadError(
            f"{path}: a .safetensors file without serfswap's metadata (weights only): load it "
            "with serfswap.io.load_model(..., arch=...)"
        )
    return _read_checkpoint(file, shapes, metadata)[0]


# The one entry point -------------------------------------------------------------------------


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
        if weights is None:
            return build_arch(spec, timm_kwargs=timm_kwargs)
        wpath = check_weights_path(weights)
        state = _weights_file(wpath, trust_pickle)
        loaded = build_arch(spec, state=state, timm_kwargs=timm_kwargs)
        load_weights(loaded.model, state, wpath)
        return loaded
    if timm_kwargs and not arch:
        raise ModelSpecError("--num-classes and --model-kwargs shape timm architectures only")
    path = _existing(spec)
    if is_onnx(path):
        raise ModelSpecError(onnx_given(spec))
    if path.is_dir():
        import transformers

        config = _hf_config(path)
        _needs_remote_code(config, spec, trust_remote_code)
        _check_folder_files(path)
        with _no_progress_bars():
            auto = transformers.AutoModel
            if causal_lm is not False and _saved_as_causal_lm(config):
                auto = transformers.AutoModelForCausalLM
            elif causal_lm is not False and _seq2seq_lm_auto(config) is not None:
                auto = _seq2seq_lm_auto(config)
            model = auto.from_pretrained(
                path, attn_implementation="eager", trust_remote_code=trust_remote_code
            )
        return Loaded(model, spec, describe(model) if not trust_remote_code else None)
    kind = sniff(path)
    if kind == "safetensors":
        shapes, metadata = _safetensors_header(path)
        if metadata.get("format") == FORMAT:
            model, described = _read_checkpoint(path, shapes, metadata)
            return Loaded(model, str(path), described)
        return _with_arch(path, _read_safetensors(path), arch, trust_remote_code, timm_kwargs)
    if kind == "pt2":
        return Loaded(_load_program(path, trust_pickle), spec)
    if kind in ("torch", "pickle"):
        obj = _unpickle(path, trust_pickle)
        if "transformers" in sys.modules:  # a transformers model: nothing later may ask
            never_ask()
        if isinstance(obj, nn.Module):
            _check_names(obj, path)
            return Loaded(obj, spec, describe(obj))
        return _with_arch(path, _state_dict(obj, path), arch, trust_remote_code, timm_kwargs)
    if kind == "corrupt-zip":
        raise ModelLoadError(f"{path}: not a readable PyTorch file (truncated or corrupt archive)")
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path}: a TorchScript archive (code, not a model serfswap loads); "
            "save the module with torch.save or its weights with safetensors"
        )
    raise ModelLoadError(
        f"{path}: not a PyTorch, safetensors or torch.export file (unknown format)"
    )


def _causal_lm_classes() -> set[str]:
    """The names of transformers' causal-LM classes (``LlamaForCausalLM``...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as lms

    return {n for v in lms.values() for n in ((v,) if isinstance(v, str) else v)}


def _saved_as_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json names a causal-LM class."""
    return bool(_causal_lm_classes() & set(config.get("architectures") or []))


def _seq2seq_lm_auto(config: dict[str, Any]) -> Any:
    """The auto class of a folder saved from an encoder-decoder with its language-model head
    (``T5ForConditionalGeneration``, ``WhisperForConditionalGeneration``...), else None: the
    head is kept, as a causal LM's is, so that the model exports with a seq2seq task."""
    import transformers
    from transformers.models.auto import modeling_auto

    saved = set(config.get("architectures") or [])
    for mapping, auto in (
        (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
        (modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, "AutoModelForSpeechSeq2Seq"),
    ):
        if saved & set(mapping.values()):
            return getattr(transformers, auto)
    return None


def _keeps_lm_head(config: dict[str, Any], state: dict[str, torch.Tensor] | None) -> bool:
    """Whether ``--arch hf:DIR`` builds the language-model head: the folder was saved from a
    causal LM, and the weights (when given) are not exactly the bare model's (a state dict of
    ``AutoModel`` loads into ``AutoModel``)."""
    if not _saved_as_causal_lm(config):
        return False
    if state is None:
        return True
    with torch.device("meta"):
        bare = _hf_from_config(config)
    return set(state) != set(bare.state_dict())


def _load_program(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram:
    if not trust_pickle:
        raise ModelLoadError(
            f"{path} is a torch.export program; loading one runs code from the file (pickled "
            "parts, imports it names, shape expressions that sympy evaluates). If you trust "
            "it, pass --trust-pickle"
        )
    try:
        return torch.export.load(path)
    except Exception as exc:  # the loader raises many kinds on a damaged archive
        raise ModelLoadError(
            f"{path}: not a readable torch.export program ({_first_line(exc)})"
        ) from None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a bar for loading a local folder's weights (an instant here): two
    stray lines on stderr for every command. Its warnings stay."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _existing(spec: str) -> Path:
    try:
        return check_input_path(spec)
    except InvalidArgumentError as exc:
        raise ModelSpecError(str(exc)) from None


def _weights_file(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("torch", "pickle"):
        return _state_dict(_unpickle(path, trust_pickle), path)
    raise ModelLoadError(f"{path}: not a state dict file (.safetensors or torch.save)")


def _with_arch(path: Path, state: dict[str, torch.Tensor], arch: str | None,
               trust_remote_code: bool, timm_kwargs: dict[str, Any] | None) -> Loaded:  # fmt: skip
    if arch is None:
        raise ModelSpecError(
            f"{path} holds weights only: name the architecture, --arch timm:NAME or --arch hf:DIR"
        )
    loaded = build_arch(arch, trust_remote_code=trust_remote_code, state=state,
                        timm_kwargs=timm_kwargs)  # fmt: skip
    load_weights(loaded.model, state, path)
    loaded.source = str(path)
    return loaded


def conversion_options(model: nn.Module) -> dict[str, Any]:
    """What reproduces ``model``'s swap on a fresh copy: the families and the converted sites."""
    report = model.__dict__.get(REPORT_ATTR)
    converted = report.converted if report is not None else []
    return {
        "activations": sorted({s.family for s in converted}),
        "sites": [s.name for s in converted],
    }
