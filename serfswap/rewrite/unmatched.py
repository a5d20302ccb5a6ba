""" "Nothing to convert": which option removed what, said once, for convert's error and plan's note.

Matching has several outcomes (the decisions of :mod:`serfswap.rewrite.selection`), so the
message names the option that left nothing (activations=, include=, exclude=, filter_fn) and
echoes the user's patterns, as PEFT's "no matching module" error does.
"""

from __future__ import annotations

from ..errors import NAMED, NothingToConvertError, Words
from .activations import GATE
from .positivity import ROLE
from .report import Plan, Site
from .selection import Decision, Options
from .sites import Found


def check_not_empty(
    plan: Plan,
    decided: list[tuple[Found, Site]],
    has_serf: bool,
    opts: Options,
    *,
    note_only: bool = False,
) -> None:
    """Raise NothingToConvertError when the plan converts nothing; with ``note_only`` (for
    :func:`~serfswap.plan`, which exists to show what would happen) the reason becomes a note."""
    if plan.converted:
        return
    if not has_serf:
        error = nothing_matched(plan.model, [item for item, _ in decided], opts)
        if not note_only:
            raise error
        plan.notes.append(f"nothing to convert: {error}")
        return
    plan.notes.append("already converted: nothing left to convert with these options")


def nothing_matched(model: str, found: list[Found], opts: Options) -> NothingToConvertError:
    """The error for a plan of ``model`` that converts none of ``found`` (decided sites)."""
    kept = [n or "(root)" for f in found if f.stage == Decision.POSITIVITY for n in f.names[:1]]
    error = _why(model, found, kept, opts)
    if kept and "positivity constraint" not in str(error):
        base = error.template if error.values else _text(error.template)
        error = NothingToConvertError(
            f"{base}; also kept as positivity constraints: {_some(kept)} (to convert them, name "
            f"them in {{include}} or add {ROLE!r} to {{activations}})",
            option=error.option or "activations",
            **{"include": NAMED, "activations": NAMED, **error.values},
        )
    return error


def _some(names: list[str]) -> str:
    """The first three names, and ``...`` when there are more (literal in a template)."""
    return _text(f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")


def _text(text: object) -> str:
    """Text from the model (names), literal in a message template."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _why(model: str, found: list[Found], kept: list[str], opts: Options) -> NothingToConvertError:
    stages = {f.stage for f in found}
    candidates = [f for f in found if f.family != GATE]
    if not candidates:
        gates = len(found)
        return NothingToConvertError(
            f"found no activation to convert in {model}"
            + (f" (only {gates} gates, which are never replaced)" if gates else "")
            + "; serfswap recognises torch.nn, timm and transformers activation modules, functions "
            "stored as attributes, and F.relu / F.gelu / F.silu / F.mish calls in module code"
        )
    seen = sorted({f.family for f in candidates})
    model = _text(model)
    if Decision.POSITIVITY in stages and stages <= {
        Decision.FAMILY,
        Decision.GATE,
        Decision.POSITIVITY,
    }:
        others = sorted({f.family for f in found if f.stage == Decision.FAMILY})
        return NothingToConvertError(
            f"every activation of {model} that {{activations}} selects is a positivity constraint "
            f"({_some(kept)}: its output must stay non-negative, see {{plan}}); to convert them "
            f"anyway, name them in {{include}} or add {ROLE!r} to {{activations}}"
            + (
                f"; its other activations are of families {others}, which {{activations}} "
                "leaves out: {everything:activations} converts them"
                if others
                else ""
            ),
            option="activations",
            activations=NAMED,
            include=NAMED,
            everything=["all"],
            plan=Words("the plan", "`serfswap inspect`"),
        )
    if Decision.FAMILY in stages and stages <= {Decision.FAMILY, Decision.GATE}:
        return NothingToConvertError(
            f"{model} has activations of families {seen}, none of which is in "
            "{activations}; pass e.g. {seen:activations}",
            option="activations",
            activations=sorted(opts.families),
            seen=seen,
        )
    examples = _text(", ".join(n for f in candidates[:3] for n in f.names[:1]))
    if Decision.INCLUDE in stages and not stages & {Decision.EXCLUDE, Decision.FILTER}:
        return NothingToConvertError(
            f"{{include}} matched none of the {len(candidates)} activations of {model} (their "
            f"names look like: {examples})",
            option="include",
            include=list(opts.include),
        )
    if Decision.EXCLUDE in stages and Decision.FILTER not in stages:
        return NothingToConvertError(
            f"{{exclude}} excluded every activation of {model} that {{include_:include}} and "
            f"{{activations}} left ({len(candidates)} found)",
            option="exclude",
            exclude=list(opts.exclude),
            include_=NAMED,
            activations=NAMED,
        )
    return NothingToConvertError(
        f"filter_fn rejected every activation of {model} that the patterns left "
        f"({len(candidates)} found, e.g. {examples})",
        option="filter_fn",
    )
