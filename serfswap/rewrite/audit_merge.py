"""The run-time audit's part in a conversion: its inputs, and the merge of what it saw.

One forward under :mod:`serfswap.rewrite.audit` reaches what static reading cannot (helpers in
other modules, modules built during the forward): each such call becomes a ``run-time`` site
converted by its module's scope, and a second forward checks that nothing that was to be
converted still runs. What does is in the report as ``left``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ExampleInputsError, InvalidArgumentError, first_line
from ..inputs import as_kwargs, can_infer, example_inputs_for
from . import audit as run_time
from .apply import apply_scopes
from .report import Plan, Site
from .selection import Decision, Options, decide, make_site, shares_constraint
from .sites import Found
from .where import same_line

LEFT = "left: reached at run time only, still runs after conversion"


def audit_inputs(
    model: nn.Module, example_inputs: Any, audit: bool | None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The keyword inputs of the run-time audit; or None, with why when inference failed.

    With ``audit=None`` (the default) a model whose inputs cannot be inferred is converted
    without the audit, and the report says why: inference reads config fields that differ by
    family, and no family's quirk may make a default convert fail. ``audit=True`` raises."""
    if audit is not None and not isinstance(audit, bool):
        raise InvalidArgumentError(f"audit= takes True, False or None, got {audit!r}")
    if audit is False:
        return None, ""
    if example_inputs is not None:
        return as_kwargs(model, example_inputs), ""
    if can_infer(model):
        try:
            with torch.random.fork_rng(devices=[]):  # convert leaves the caller's random state
                return example_inputs_for(model, batch=1), ""
        except Exception as error:  # any config's surprise: reported, or raised with audit=True
            why = _first_line(error).split(": pass example_inputs")[0]
            if audit:
                raise ExampleInputsError(
                    f"audit=True: cannot infer inputs for a {type(model).__name__} ({why}); "
                    "pass example_inputs="
                ) from error
            return None, f"its inputs could not be inferred ({why})"
    if audit:
        raise ExampleInputsError(
            f"audit=True needs example_inputs= for a {type(model).__name__} (serfswap infers "
            "them for timm and transformers models only)"
        )
    return None, ""


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters, for a report."""
    return f"{type(error).__name__}: {first_line(error) if str(error).strip() else ''}"[:300]


def not_audited(report: Plan, why: str) -> None:
    """Say in ``report`` that the audit did not run because inputs could not be inferred."""
    if why:
        report.audit_error = why
        report.notes.append(
            f"not audited at run time: {why}; pass example_inputs= to check what still runs"
        )


def _run_time_decision(
    ran: run_time.Ran, decided: list[tuple[Found, Site]], opts: Options
) -> tuple[Found, Decision, str] | None:
    """What to do with an activation the audit saw run: None when a static site already says
    (it is that site, or its module's decision for the family stands), else a run-time site
    with its (decision, reason)."""
    if ran.kind == "module":  # an activation module of the model: the plan decided it
        return None
    statics = [
        (item, site)
        for item, site in decided
        if item.owner is ran.owner and item.family == ran.family
    ]
    if any(same_line(item.where, ran.where) for item, _ in statics):
        return None
    item = Found("run-time", [ran.name], ran.call, ran.family, ran.owner, where=ran.where)
    kept = next((site for _, site in statics if not site.convert), None)
    if kept is not None and kept.role:
        return item, Decision.POSITIVITY, shares_constraint(kept.where or kept.name)
    if kept is not None:
        return None  # the module's own skip of this family (excluded, filtered...) covers it
    stage, reason = decide(item, opts)
    return item, stage, reason


def _run_audit(
    model: nn.Module, inputs: dict[str, torch.Tensor], report: Plan
) -> run_time.ActivationRecorder | None:
    try:
        return run_time.run(model, inputs)
    except Exception as error:  # the model's own failure: reported, the conversion stands
        report.audit_error = _first_line(error)
        report.audited = False
        report.notes.append(
            f"not audited at run time: the forward on the example inputs failed "
            f"({report.audit_error}); pass example_inputs= that the model accepts"
        )
        return None


def merge_audit(
    root: nn.Module,
    decided: list[tuple[Found, Site]],
    opts: Options,
    inputs: dict[str, torch.Tensor],
    report: Plan,
) -> list[tuple[Found, Site]]:
    """Reach the activations only a forward shows, then check that none that was to be
    converted still runs; returns ``decided`` with the run-time sites added."""
    recorder = _run_audit(root, inputs, report)
    if recorder is None:
        return decided
    added: list[tuple[Found, Site]] = []
    for ran in recorder.ran:
        decision = _run_time_decision(ran, decided, opts)
        if decision is not None:
            item, stage, reason = decision
            if stage == Decision.CONVERT and ran.kind == "built":  # no scope reaches its math
                stage = Decision.LEFT
                reason = LEFT + " (an activation module built during the forward)"
            added.append((item, make_site(item, stage, reason)))
    decided = decided + added
    if any(site.convert for _, site in added):
        apply_scopes(decided)
        recorder = _run_audit(root, inputs, report)
        if recorder is None:
            return decided
        for ran in recorder.ran:  # a second forward: what the scopes did not reach
            decision = _run_time_decision(ran, decided, opts)
            if decision is not None and decision[1] == Decision.CONVERT:
                item = decision[0]
                decided.append((item, make_site(item, Decision.LEFT, LEFT)))
    report.sites = [site for _, site in decided]
    report.audited = True
    return decided
