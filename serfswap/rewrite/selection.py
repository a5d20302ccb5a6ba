"""Selection: the options of plan / convert, and the decision each site gets from them.

Every site the finders return (:mod:`serfswap.rewrite.sites`) gets one :class:`Decision`:
``convert``, or the stage that skipped it (a gate, a family not selected, a positivity
constraint, include=, exclude=, filter_fn). The static plan is the list of those decisions.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from torch import nn

from ..errors import InvalidArgumentError
from .activations import GATE, resolve_families
from .positivity import ROLE
from .report import Plan, Site
from .sites import Found, find

FilterFn = Callable[[nn.Module, str], bool]


class Decision(str, Enum):
    """What the plan does with a site: convert it, or the stage that skipped it. A str, so a
    decision compares and prints as its value (``"family"``), as the bare strings did."""

    CONVERT = "convert"
    GATE = "gate"  # a gate or normaliser (sigmoid, softmax...): never replaced
    FAMILY = "family"  # a family activations= does not select
    POSITIVITY = ROLE  # a positivity constraint, not opted in
    INCLUDE = "include"
    EXCLUDE = "exclude"
    FILTER = "filter"
    LEFT = "left"  # to be converted, yet the audit saw it still run

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class Options:
    """The selection options of plan / convert, checked once."""

    families: frozenset[str]
    positivity: bool  # the "positivity" opt-in of activations=
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    filter_fn: FilterFn | None


def options(
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    filter_fn: FilterFn | None,
    activations: Iterable[str | type] | str | None,
) -> Options:
    """Check the selection arguments of plan / convert (every check before any change)."""
    activations, positivity = _split_role(activations)
    if filter_fn is not None and not callable(filter_fn):
        raise InvalidArgumentError(
            f"filter_fn must be callable (module, name) -> bool, got {filter_fn!r}"
        )
    return Options(
        resolve_families(activations),
        positivity,
        _patterns(include, "include"),
        _patterns(exclude, "exclude"),
        filter_fn,
    )


def _patterns(value: str | Iterable[str] | None, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise InvalidArgumentError(
            f"{arg}= takes a glob pattern or a list of them, got {type(value).__name__} {value!r}"
        )
    patterns = tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise InvalidArgumentError(f"{arg}= takes glob patterns (str), got {value!r}")
    return patterns


def _split_role(
    activations: Iterable[str | type] | str | None,
) -> tuple[Iterable[str | type] | str | None, bool]:
    """``activations`` without the ``"positivity"`` opt-in, and whether it was there. Alone, it
    keeps the default families: ``activations="positivity"`` is the default plus the opt-in."""
    if isinstance(activations, str):
        return (None, True) if activations == ROLE else (activations, False)
    if activations is None or not isinstance(activations, Iterable):
        return activations, False
    items = list(activations)
    rest = [a for a in items if a != ROLE]
    if len(rest) == len(items):
        return items, False
    return (rest or None), True


def _matches(names: list[str], patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


_GLOB = frozenset("*?[")


def _names_explicitly(names: list[str], patterns: tuple[str, ...]) -> str | None:
    """The first pattern that names one of ``names`` explicitly: it matches the name, and its
    last dotted part is literal (``"stages.3.*.kernel_func"``, ``"*.kernel_func"``, the full
    name; not ``"*"`` nor ``"stages.3.*"``, which select whole regions of a model)."""
    for pattern in patterns:
        last = pattern.rsplit(".", 1)[-1]
        if last and not (_GLOB & set(last)) and _matches(names, (pattern,)) is not None:
            return pattern
    return None


def decide(item: Found, opts: Options) -> tuple[Decision, str]:
    """(decision, reason): ``convert``, or the stage that skipped the site and why.

    A positivity constraint (:mod:`serfswap.rewrite.positivity`) is skipped unless
    ``positivity`` (the ``"positivity"`` opt-in of ``activations=``) or an include pattern
    names it explicitly.
    """
    if item.family == GATE:
        return Decision.GATE, "gate or normaliser, never replaced"
    if item.family not in opts.families:
        if item.family == "prelu":
            reason = "has learned parameters; name 'prelu' in activations= to replace it"
            return Decision.FAMILY, reason
        return Decision.FAMILY, f"family {item.family!r} not selected (activations=)"
    if (
        item.constraint is not None
        and not opts.positivity
        and not _names_explicitly(item.names, opts.include)
    ):
        return Decision.POSITIVITY, f"positivity constraint, {item.constraint}"
    if opts.include and _matches(item.names, opts.include) is None:
        return Decision.INCLUDE, "not matched by include="
    if opts.exclude and (pattern := _matches(item.names, opts.exclude)) is not None:
        return Decision.EXCLUDE, f"excluded by {pattern!r}"
    if opts.filter_fn is not None and not opts.filter_fn(item.owner, item.names[0]):
        return Decision.FILTER, "rejected by filter_fn"
    return Decision.CONVERT, ""


def shares_constraint(where: str) -> str:
    """The reason a call is kept because its module and function hold a kept positivity
    constraint at ``where``: the scope that converts functional calls works per module and
    family, so converting the call would convert the constraint too."""
    return (
        f"same module and function as the positivity constraint at {where} "
        "(functional calls are converted per module and function)"
    )


def _share_functional_skips(found: list[Found], decisions: list[tuple[Decision, str]]) -> None:
    """Skip every functional call of a family in a module where one call of it is a kept
    positivity constraint (see :func:`shares_constraint`)."""
    kept: dict[tuple[int, str], str] = {}
    for item, (stage, _) in zip(found, decisions, strict=True):
        if item.kind == "functional" and stage == Decision.POSITIVITY:
            kept.setdefault((id(item.owner), item.family), item.where)
    for i, (item, (stage, _)) in enumerate(zip(found, decisions, strict=True)):
        where = kept.get((id(item.owner), item.family))
        if item.kind == "functional" and stage == Decision.CONVERT and where is not None:
            decisions[i] = (Decision.POSITIVITY, shares_constraint(where))


def make_site(item: Found, stage: Decision, reason: str) -> Site:
    """The report's line for ``item``, decided ``stage``; records the decision on ``item``."""
    item.stage = stage
    return Site(
        name=item.names[0],
        kind=item.kind,
        source=item.source,
        family=item.family,
        convert=stage == Decision.CONVERT,
        reason=reason,
        gated=item.gated and stage == Decision.CONVERT,
        aliases=tuple(item.names[1:]),
        where=item.where,
        role=ROLE if item.constraint is not None else "",
        rule=item.constraint.rule if item.constraint is not None else "",
        left=stage == Decision.LEFT,
    )


def static_plan(model: nn.Module, opts: Options) -> tuple[Plan, list[tuple[Found, Site]], bool]:
    """The static plan: every site the walk finds, each with its decision; and whether the
    model already holds serfswap's Serf."""
    found, has_serf = find(model)
    decisions = [decide(item, opts) for item in found]
    _share_functional_skips(found, decisions)
    decided = [
        (item, make_site(item, stage, reason))
        for item, (stage, reason) in zip(found, decisions, strict=True)
    ]
    plan = Plan(type(model).__name__, [site for _, site in decided])
    kept = sum(stage == Decision.POSITIVITY for stage, _ in decisions)
    if kept:
        plan.notes.append(
            f"{kept} positivity constraint{'s' if kept > 1 else ''} kept (linear-attention feature "
            "maps, relu(x) + eps before a division, sqrt or log: Serf is negative below 0); to "
            f"convert, name them in include= (e.g. '*.kernel_func') or add {ROLE!r} to activations="
        )
    return plan, decided, has_serf
