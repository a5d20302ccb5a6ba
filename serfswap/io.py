"""Loading models for the command line, safely, and serfswap's own checkpoint format.

MODEL may be:

* ``timm:NAME``: a timm architecture (random weights, or ``weights=FILE``);
* a HuggingFace model directory (``config.json`` plus weights);
* a serfswap checkpoint (``serfswap convert`` writes it): a ``.safetensors`` file whose metadata
  describes the architecture and the swap, so loading it runs no pickled code;
* a state dict, checkpoint dict or ``.safetensors`` file, with ``arch="timm:NAME"`` or
  ``arch="hf:DIR"``;
* a ``torch.export`` program (``.pt2``);
* a full pickled ``nn.Module`` (``torch.save(model)``). Pickles run code when loaded, so one is
  loaded only when every global it references (listed without running it) comes from torch,
  timm, transformers or serfswap, or with ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .convert import REPORT_ATTR, convert
from .errors import InvalidArgumentError, SerfswapError

FORMAT = "serfswap-checkpoint/1"
_TRUSTED_PREFIXES = ("torch.", "timm.", "transformers.", "serfswap.", "collections.OrderedDict")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


class ModelLoadError(SerfswapError, ValueError):
    """MODEL cannot be loaded: corrupt, of an unknown form, mismatched, or unsafe to unpickle."""


class ModelSpecError(ModelLoadError):
    """MODEL or --arch is wrong on the command line: no such path, unknown architecture."""

    exit_code = 2


@dataclass
class Loaded:
    """A loaded model and what is known of how to rebuild it (for ``serfswap convert``)."""

    model: nn.Module | torch.export.ExportedProgram
    source: str
    arch: dict[str, Any] | None = (
        None  # {"kind": "timm", "name": ...} or {"kind": "hf", "config": {...}}
    )


# Architectures -------------------------------------------------------------------------------


def _timm(name: str, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelSpecError(f"unknown timm architecture {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False, **kwargs)


def _hf_dir(directory: Path) -> Path:
    if not directory.is_dir():
        raise ModelSpecError(f"{directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelSpecError(f"{directory} has no config.json: not a HuggingFace model directory")
    return directory


def _hf_from_config(config_dict: dict[str, Any]) -> nn.Module:
    import transformers

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError("the HuggingFace config names no model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    return transformers.AutoModel.from_config(config, attn_implementation="eager")


def build_arch(arch: str) -> Loaded:
    """``timm:NAME`` or ``hf:DIR`` with random weights (hf: the directory's config only)."""
    kind, _, name = arch.partition(":")
    if kind == "timm" and name:
        model = _timm(name)
        return Loaded(model, arch, {"kind": "timm", "name": name, "num_classes": model.num_classes})
    if kind == "hf" and name:
        config = json.loads((_hf_dir(Path(name)) / "config.json").read_text())
        return Loaded(_hf_from_config(config), arch, {"kind": "hf", "config": config})
    raise ModelSpecError(f"--arch {arch!r}: use timm:NAME or hf:DIR")


def _rebuild(arch: dict[str, Any]) -> nn.Module:
    if arch.get("kind") == "timm":
        return _timm(arch["name"], num_classes=arch.get("num_classes", 1000))
    if arch.get("kind") == "hf":
        return _hf_from_config(arch["config"])
    raise ModelLoadError(f"checkpoint describes an unknown architecture: {arch}")


def describe(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model`` without pickles: a timm name, or a HuggingFace config."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return {"kind": "timm", "name": cfg["architecture"], "num_classes": model.num_classes}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"kind": "hf", "config": config.to_dict()}
    return None


# Weights -------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc})") from None


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({reason})") from None
    except Exception as exc:  # pickle.UnpicklingError and kin, raised for unsafe content
        reason = str(exc).splitlines()[0]
        raise ModelLoadError(f"{path}: cannot be loaded safely ({reason})") from None


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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the first differing keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        raise ModelLoadError(f"{path} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state)


def untrusted_globals(path: Path) -> list[str]:
    """The globals a pickle needs that do not come from torch / timm / transformers / serfswap."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return sorted(n for n in names if not n.startswith(_TRUSTED_PREFIXES))


# Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    model: nn.Module,
    path: Path,
    arch: dict[str, Any],
    options: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> None:
    """Weights plus the architecture and the swap, as safetensors metadata: no pickled code.
    ``extra`` adds metadata entries of the caller's (the demo records how it trained)."""
    from safetensors.torch import save_file

    metadata = {
        **(extra or {}),
        "format": FORMAT,
        "serfswap_version": __version__,
        "arch": json.dumps(arch),
        "swap": json.dumps(options),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def write_checkpoint(
    model: nn.Module, arch: dict[str, Any], out: Path, extra: dict[str, str] | None = None
) -> None:
    """:func:`save_checkpoint` beside ``out``, then renamed over it: never half-written."""
    staged = out.with_name(f".{out.name}.tmp")
    try:
        save_checkpoint(model, staged, arch, conversion_options(model), extra)
        # safetensors creates files readable by their owner only; give the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)


def _load_checkpoint(
    path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Loaded:
    arch = json.loads(metadata["arch"])
    model = _rebuild(arch)
    swap = json.loads(metadata["swap"])
    sites = set(swap["sites"])
    model = convert(
        model,
        inplace=True,
        activations=swap["activations"],
        filter_fn=lambda module, name: name in sites,
    )
    load_weights(model, state, path)
    return Loaded(model, str(path), arch)


def check_output_path(path: Path) -> None:
    """Fail before any work when ``path`` cannot be written: missing or read-only directory."""
    directory = path.parent
    if not directory.is_dir():
        raise InvalidArgumentError(f"output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise InvalidArgumentError(f"output directory {directory} is not writable")
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a directory; give a file name")


# The one entry point -------------------------------------------------------------------------


def load_model(
    spec: str, *, arch: str | None = None, weights: str | None = None, trust_pickle: bool = False
) -> Loaded:
    """Load MODEL as the CLI understands it (see the module docstring)."""
    if spec.startswith("timm:") and not Path(spec).exists():
        loaded = build_arch(spec)
        if weights is not None:
            wpath = _existing(weights)
            load_weights(loaded.model, _weights_file(wpath), wpath)
        return loaded
    path = _existing(spec)
    if path.is_dir():
        import transformers

        _hf_dir(path)
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
        return Loaded(model, spec, {"kind": "hf", "config": model.config.to_dict()})
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        if metadata.get("format") == FORMAT:
            return _load_checkpoint(path, state, metadata)
        return _with_arch(path, state, arch)
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable torch.export program ({exc})") from None
        return Loaded(program, spec)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a readable PyTorch file (truncated or corrupt archive)")
    if not magic.startswith(b"PK") and not magic.startswith(b"\x80"):  # zip, or legacy pickle
        raise ModelLoadError(
            f"{path}: not a PyTorch, safetensors or torch.export file (unknown format)"
        )
    try:
        obj = _torch_load(path, weights_only=True)
    except ModelLoadError:
        obj = _unpickle(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return Loaded(obj, spec, describe(obj))
    return _with_arch(path, _state_dict(obj, path), arch)


def _existing(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise ModelSpecError(f"{spec}: no such file or directory")
    return path


def _weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    return _state_dict(_torch_load(path, weights_only=True), path)


def _with_arch(path: Path, state: dict[str, torch.Tensor], arch: str | None) -> Loaded:
    if arch is None:
        raise ModelSpecError(
            f"{path} holds weights only: name the architecture, --arch timm:NAME or --arch hf:DIR"
        )
    loaded = build_arch(arch)
    load_weights(loaded.model, state, path)
    loaded.source = str(path)
    return loaded


def _unpickle(path: Path, trust_pickle: bool) -> Any:
    untrusted = untrusted_globals(path)
    if untrusted and not trust_pickle:
        raise ModelLoadError(
            f"{path} is a pickle that would import {', '.join(untrusted[:5])}"
            + (" and more" if len(untrusted) > 5 else "")
            + "; loading it runs code from the file. If you trust it, pass --trust-pickle"
        )
    return _torch_load(path, weights_only=False)


def conversion_options(model: nn.Module) -> dict[str, Any]:
    """What reproduces ``model``'s swap on a fresh copy: the families and the converted sites."""
    report = model.__dict__.get(REPORT_ATTR)
    converted = report.converted if report is not None else []
    return {
        "activations": sorted({s.family for s in converted}),
        "sites": [s.name for s in converted],
    }
