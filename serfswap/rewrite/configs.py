"""HuggingFace configs that say "serf" where the activations were converted, and how they load
back. The registration of Serf as "serf" in timm and transformers is :mod:`serfswap.hooks`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from .activations import string_family
from .registration import NAME
from .report import Plan

_package = "serfswap"
# What a saved config says to whoever loads it. serfswap is not on a package index: it installs
# from its source (a checkout, or a git URL), which is what the hint says.
INSTALL_HINT = (
    f"activations replaced by Serf: install {_package} from its source (`pip install -e .` in a "
    f"checkout of it) and `import {_package}` before from_pretrained"
)


# HuggingFace configs -------------------------------------------------------------------------

# Config fields that name an activation: hidden_act, activation_function (GPT-2), dense_act_fn
# (T5), hidden_activation (Gemma), projector_hidden_act, feat_extract_activation...
_ACT_FIELD = re.compile(r"(^|_)(act|act_fn|activation|activation_function)$")
_MARKER = "serfswap"  # a config entry that says why "serf" is there and what loads it


def _hf_config(model: nn.Module) -> Any | None:
    config = getattr(model, "config", None)
    if config is None or not type(config).__module__.startswith("transformers"):
        return None
    return config


def _sub_configs(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = [(prefix, config)]
    for key, value in vars(config).items():
        if type(value).__module__.startswith("transformers") and hasattr(value, "to_dict"):
            found.extend(_sub_configs(value, f"{prefix}{key}."))
    return found


def _fully_converted(report: Plan) -> set[str]:
    converted = {s.family for s in report.converted}
    return converted - {s.family for s in report.skipped}


def update_hf_config(model: nn.Module, report: Plan) -> dict[str, tuple[str, str]]:
    """Set "serf" in the config fields naming a family that was converted everywhere."""
    config = _hf_config(model)
    if config is None:
        return {}
    full = _fully_converted(report)
    updates: dict[str, tuple[str, str]] = {}
    for prefix, cfg in _sub_configs(config):
        for key, value in list(vars(cfg).items()):
            if not isinstance(value, str):
                continue
            if key == "feed_forward_proj":  # T5: "relu" or "gated-gelu" derives dense_act_fn
                head, _, act = value.rpartition("-")
                new = f"{head}-{NAME}" if head else NAME
            elif _ACT_FIELD.search(key):
                act, new = value, NAME
            else:
                continue
            if string_family(act) in full:
                setattr(cfg, key, new)
                updates[prefix + key] = (value, new)
    if updates:
        setattr(
            config,
            _MARKER,
            INSTALL_HINT,
        )
    return updates


def config_notes(model: nn.Module, report: Plan) -> list[str]:
    """Why a HuggingFace config could not say "serf" everywhere the model has it."""
    if _hf_config(model) is None:
        return []
    notes = []
    partial = {s.family for s in report.converted} - _fully_converted(report)
    if partial:
        notes.append(
            f"config not updated for {sorted(partial)}: only part of them was converted, which a "
            "config cannot express; save with serfswap's checkpoint instead of save_pretrained"
        )
    if any(s.kind in ("functional", "run-time") for s in report.converted):
        notes.append(
            "functional calls are not config fields: after from_pretrained, call "
            "serfswap.convert(model) again to convert them"
        )
    return notes


def _undo_updates(config: Any, report: Plan) -> None:
    for path, (old, _) in report.config_updates.items():
        *parents, key = path.split(".")
        cfg = config
        for parent in parents:
            cfg = getattr(cfg, parent)
        setattr(cfg, key, old)
    if hasattr(config, _MARKER):
        delattr(config, _MARKER)


def restore_hf_config(model: nn.Module, report: Plan) -> None:
    config = _hf_config(model)
    if config is not None:
        _undo_updates(config, report)


def config_before(config: Any, report: Plan | None) -> dict[str, Any]:
    """``config`` as a dict, as it was before :func:`update_hf_config` wrote "serf" into it
    for ``report``'s conversion: a checkpoint rebuilds the original model from it, then its
    recorded swap converts that model as this one was (and updates the config the same way)."""
    if report is None or not report.config_updates:
        return config.to_dict()
    original = copy.deepcopy(config)
    _undo_updates(original, report)
    return original.to_dict()
