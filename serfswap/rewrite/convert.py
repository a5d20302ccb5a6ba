"""plan() / convert() / revert(): put Serf where a model's activations are, and take it out again.

The stages, each in its module: the walk over ``_modules`` (:mod:`.walk`) and the site finders
(:mod:`.sites`) find five kinds of site statically: activation modules, activations inside
fused norm+act layers (timm's ``BatchNormAct2d.act``), activation functions stored as
attributes, functional calls in a module's code and activations chosen by a string (see
:mod:`serfswap.rewrite.functional`). Selection (:mod:`.selection`) decides each one from the
options; :mod:`.unmatched` says which option left nothing. Then, given example inputs (inferred
for timm and transformers models), one forward under :mod:`serfswap.rewrite.audit` reaches what
static reading cannot (helpers in other modules, modules built during the forward): each such
call becomes a ``run-time`` site converted by its module's scope, and a second forward checks
that nothing that was to be converted still runs (:mod:`.audit_merge`). What does is in the
report as ``left``; ``strict=True`` raises.

Plan, validate, then mutate (:mod:`.apply`): every check runs before the first change, so an
error leaves the model as it was. Each Serf keeps the module it replaced (unregistered, so it is
in neither ``state_dict`` nor ``named_modules``), which is what lets :func:`revert` restore the
original objects and their bit-identical outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, NothingToConvertError, PartialConversionError
from . import configs as integrations
from .apply import apply, unapply
from .audit_merge import audit_inputs, merge_audit, not_audited
from .report import Plan
from .selection import FilterFn, Options, options, static_plan
from .unmatched import check_not_empty

REPORT_ATTR = "serfswap_report"


def _check_model(model: object, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{function}() takes a torch nn.Module, got {type(model).__name__} {model!r:.60}"
        )


def _convert(
    target: nn.Module,
    opts: Options,
    inputs: dict[str, torch.Tensor] | None,
    why: str = "",
    *,
    planning: bool = False,
) -> nn.Module:
    """Convert ``target`` in place; its report is the root's ``serfswap_report``. With
    ``planning`` (a copy converted for :func:`plan`), converting nothing is a note, not an
    error."""
    report, decided, has_serf = static_plan(target, opts)
    if inputs is None:
        check_not_empty(report, decided, has_serf, opts, note_only=planning)
    root = apply(target, decided)
    if inputs is not None:
        decided = merge_audit(root, decided, opts, inputs, report)
        try:
            check_not_empty(report, decided, has_serf, opts, note_only=planning)
        except NothingToConvertError:
            revert(root)
            raise
    elif why:
        not_audited(report, why)
    else:
        report.notes.append(
            "not audited at run time: pass example_inputs= to check what still runs"
        )
    if not report.converted and REPORT_ATTR in root.__dict__:  # nothing more: its report stands
        return root
    report.applied = True
    previous = root.__dict__.get(REPORT_ATTR)
    report.config_updates = dict(previous.config_updates) if previous is not None else {}
    report.config_updates.update(integrations.update_hf_config(root, report))
    report.notes.extend(integrations.config_notes(root, report))
    root.__dict__[REPORT_ATTR] = report
    return root


def plan(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    activations: Iterable[str | type] | str | None = None,
    example_inputs: Any = None,
    audit: bool | None = None,
) -> Plan:
    """What :func:`convert` would change, changing nothing.

    Args:
        include: glob patterns over module names (``"blocks.1[0-1].*"``); only matching sites.
        exclude: glob patterns; matching sites are left alone.
        filter_fn: ``(module, name) -> bool``; the module is the activation itself, or the module
            that holds the function or makes the call.
        activations: families (``"relu"``, ``"gelu"``, ``"silu"``, ``"mish"``, ``"hardswish"``...),
            classes (``nn.ReLU``), or ``"all"``; default: the ReLU / GELU / Swish / Mish family.
            Add ``"positivity"`` to convert positivity constraints too (alone, it means the
            default families plus them).
        example_inputs: a tensor, a tuple or a dict of keyword tensors for the run-time audit;
            inferred for timm and transformers models.
        audit: ``None`` (default): run the audit when inputs are given or can be inferred;
            ``True``: run it or raise; ``False``: the static plan only.

    Positivity constraints (:mod:`serfswap.positivity`: linear-attention feature maps such as
    timm's ``LiteMLA.kernel_func``, ``relu(x) + eps`` before a division, sqrt or log) are left
    alone, with the rule that recognised them in the plan, unless ``activations=`` holds
    ``"positivity"`` or an ``include=`` pattern names them explicitly: it matches the site's
    name and its last dotted part has no wildcard (``"*.kernel_func"``, a full name; ``"*"``
    does not name them). ``"all"`` means all families, not this role.

    With the audit, the plan is the report of a conversion of a copy of ``model`` (what only a
    forward can show needs a converted model to run); without it, the static walk.

    When nothing would be converted the plan says so (0 to convert, each site's reason) and a
    note says which option removed what: :func:`convert` raises ``NothingToConvertError`` with
    that message, the plan shows it.
    """
    _check_model(model, "plan")
    opts = options(include, exclude, filter_fn, activations)
    inputs, why = audit_inputs(model, example_inputs, audit)
    if inputs is None:
        report, decided, has_serf = static_plan(model, opts)
        check_not_empty(report, decided, has_serf, opts, note_only=True)
        not_audited(report, why)
        return report
    report = _convert(copy.deepcopy(model), opts, inputs, planning=True).__dict__[REPORT_ATTR]
    return replace(report, applied=False, config_updates={})


def convert(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
    activations: Iterable[str | type] | str | None = None,
    inplace: bool = False,
    example_inputs: Any = None,
    audit: bool | None = None,
    strict: bool = False,
) -> nn.Module:
    """Replace the activations of ``model`` with Serf; see :func:`plan` for the options.

    Returns a converted deep copy (the original stays intact: it is the teacher for
    :func:`serfswap.recover`); with ``inplace=True`` the given model is converted. Always use the
    return value: when the root itself is an activation, the result is a new module. The result
    carries ``.serfswap_report`` (print it for a table). Converting a converted model is a
    no-op. A HuggingFace model whose activations of a family were all converted gets ``"serf"``
    in the config fields that named them, so ``save_pretrained`` / ``from_pretrained`` (after
    ``import serfswap``) rebuilds it.

    The run-time audit (``example_inputs=``, ``audit=``; see :func:`plan`) runs one forward
    after the static conversion, converts what only it reaches (a helper function's ``F.silu``
    runs under its module's scope) and checks with a second forward that nothing that was to be
    converted still runs; the report lists anything that does as ``left``. ``strict=True``
    raises :class:`~serfswap.PartialConversionError` then, or when the audit could not run,
    leaving ``model`` as it was.

    >>> import torch.nn as nn, serfswap
    >>> net = serfswap.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> net[1]
    Serf()
    """
    _check_model(model, "convert")
    opts = options(include, exclude, filter_fn, activations)
    inputs, why = audit_inputs(model, example_inputs, True if strict else audit)
    if inputs is None and not inplace:  # nothing to convert costs no deep copy
        check_not_empty(*static_plan(model, opts), opts)
    target = model if inplace else copy.deepcopy(model)
    root = _convert(target, opts, inputs, why)
    report = root.__dict__[REPORT_ATTR]
    if strict and (report.left or not report.audited):
        revert(root)
        why = (
            f"{len(report.left)} activations that were to be converted still run: "
            + "; ".join(f"{s.name or '(root)'} {s.source} at {s.where}" for s in report.left[:3])
            if report.left
            else f"the run-time audit could not run ({report.audit_error})"
        )
        raise PartialConversionError(f"convert(strict=True): {why}")
    return root


def revert(model: nn.Module) -> nn.Module:
    """Put back every activation :func:`convert` replaced; returns the (possibly new) root.

    Outputs are bit-identical to the model before conversion: the original module and function
    objects come back. A model that was not converted is returned as it is.
    """
    _check_model(model, "revert")
    root = unapply(model)
    report = model.__dict__.pop(REPORT_ATTR, None)
    if report is not None:
        integrations.restore_hf_config(model, report)
    return root
