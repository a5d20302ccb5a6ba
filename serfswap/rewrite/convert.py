"""plan() / convert() / revert(): put Serf where a model's activations are, and take it out again.

The walk recurses over ``_modules`` (not ``named_modules()``, which visits a shared instance
once) and records every (parent, key) that holds each activation instance, so a module shared by
several parents becomes one shared Serf. It finds five kinds of site statically: activation
modules, activations inside fused norm+act layers (timm's ``BatchNormAct2d.act``), activation
functions stored as attributes, functional calls in a module's code and activations chosen by a
string (see :mod:`serfswap.functional`). Then, given example inputs (inferred for timm and
transformers models), one forward under :mod:`serfswap.audit` reaches what static reading cannot
(helpers in other modules, modules built during the forward): each such call becomes a
``run-time`` site converted by its module's scope, and a second forward checks that nothing that
was to be converted still runs. What does is in the report as ``left``; ``strict=True`` raises.

Plan, validate, then mutate: every check runs before the first change, so an error leaves the
model as it was. Each Serf keeps the module it replaced (unregistered, so it is in neither
``state_dict`` nor ``named_modules``), which is what lets :func:`revert` restore the original
objects and their bit-identical outputs.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import (
    NAMED,
    ExampleInputsError,
    InvalidArgumentError,
    NothingToConvertError,
    PartialConversionError,
    Words,
    first_line,
)
from ..inputs import as_kwargs, can_infer, example_inputs_for
from ..ops.serf import Serf
from . import audit as run_time
from . import configs as integrations
from .activations import GATE, class_family, function_info, resolve_families
from .configs import NAME
from .functional import (
    FunctionalScope,
    SerfFunction,
    class_call_sites,
    class_string_sites,
    function_name,
    string_site_family,
)
from .positivity import ROLE, Constraint, class_constraints
from .report import Plan, Site

FilterFn = Callable[[nn.Module, str], bool]
REPORT_ATTR = "serfswap_report"
ORIGINAL_ATTR = "_serfswap_original"  # in a converted Serf's __dict__: the module it replaced
_STRINGS_ATTR = "_serfswap_strings"  # {attribute: original name} of converted string sites

# Children that make an MLP gated (LLaMA / Mistral / Gemma, Phi-3, T5 v1.1, Mixtral experts).
_GATE_PROJECTIONS = frozenset({"gate_proj", "gate_up_proj", "wi_0", "w1", "w3"})


@dataclass
class Ref:
    """One place that holds a module instance: ``parent._modules[key]``, named ``name``."""

    parent: nn.Module | None  # None: the root itself
    key: str
    name: str


@dataclass
class _Found:
    """A site found by the walk, with what convert needs to change it."""

    kind: str
    names: list[str]
    source: str
    family: str
    owner: nn.Module  # what filter_fn sees: the activation module, or the module that holds it
    gated: bool = False
    where: str = ""
    module: nn.Module | None = None  # kind module / norm-act: the instance
    attribute: str = ""  # kind attribute: the key in owner.__dict__
    refs: list[Ref] = field(default_factory=list)
    constraint: Constraint | None = None  # a positivity constraint (serfswap.positivity)
    stage: str = ""  # what the plan decided: "convert" or the stage that skipped it


def _module_constraint(refs: list[Ref]) -> Constraint | None:
    """The positivity constraint any parent that calls this activation module puts on it."""
    for ref in refs:
        if ref.parent is not None:
            found = class_constraints(type(ref.parent)).attributes.get(ref.key)
            if found is not None:
                return found
    return None


def walk(root: nn.Module) -> tuple[dict[int, list[Ref]], list[tuple[str, nn.Module]]]:
    """Every (parent, key) holding each module instance, and each instance once, in order.

    Not ``named_modules()``: it lists a shared instance once, under its first name, and a
    conversion must reach every holder of it."""
    refs: dict[int, list[Ref]] = {id(root): [Ref(None, "", "")]}
    order: list[tuple[str, nn.Module]] = [("", root)]

    def visit(module: nn.Module, prefix: str) -> None:
        for key, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            first_visit = id(child) not in refs
            refs.setdefault(id(child), []).append(Ref(module, key, name))
            if first_visit:
                order.append((name, child))
                visit(child, name)

    visit(root, "")
    return refs, order


# The walker's verbs: what convert, revert and recovery's blend ramp do to the module tree.


def put(refs: Iterable[Ref], module: nn.Module) -> bool:
    """Write ``module`` into every place in ``refs`` (all the holders of one shared instance,
    from :func:`walk`); True when one of them is the root, which no parent holds: the caller's
    root is then ``module``."""
    is_root = False
    for ref in refs:
        if ref.parent is None:
            is_root = True
        else:
            ref.parent._modules[ref.key] = module
    return is_root


def original_of(serf: nn.Module) -> nn.Module | None:
    """The module :func:`convert` replaced with ``serf``; None for anything else (a Serf the
    user put in, or not a Serf at all)."""
    return serf.__dict__.get(ORIGINAL_ATTR) if isinstance(serf, Serf) else None


def converted_serfs(model: nn.Module) -> list[tuple[Serf, list[Ref]]]:
    """Each Serf :func:`convert` put into ``model``, once, with every place that holds it."""
    refs, order = walk(model)
    return [(m, refs[id(m)]) for _, m in order if original_of(m) is not None]


def _class_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn"):
        module = "nn"
    return f"{module}.{cls.__qualname__}" if module != "builtins" else cls.__qualname__


def _is_norm_act(module: nn.Module | None) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.layers.norm_act") or "NormAct" in cls.__name__


def _is_gated(parent: nn.Module | None) -> bool:
    if parent is None:
        return False
    return any(key in _GATE_PROJECTIONS for key in parent._modules)


def _find(root: nn.Module) -> tuple[list[_Found], bool]:
    """All activation sites of ``root``, and whether it already holds serfswap's Serf."""
    refs, order = walk(root)
    found: list[_Found] = []
    has_serf = False
    for name, module in order:
        if isinstance(module, Serf):
            has_serf = True
        elif class_family(type(module)) is not None:
            found.append(_module_site(module, refs[id(module)]))
        else:
            has_serf |= _holds_serf(module)
            found.extend(_attribute_sites(name, module))
            found.extend(_string_sites(name, module))
            found.extend(_functional_sites(name, module))
    return found, has_serf


def _holds_serf(module: nn.Module) -> bool:
    """Whether convert already changed this module's attributes, strings or forward."""
    return bool(module.__dict__.get(_STRINGS_ATTR)) or any(
        isinstance(value, SerfFunction | FunctionalScope) for value in vars(module).values()
    )


def _module_site(module: nn.Module, refs: list[Ref]) -> _Found:
    """An activation module, under every name that holds it (in a fused norm+act or not)."""
    parent = refs[0].parent
    return _Found(
        kind="norm-act" if _is_norm_act(parent) else "module",
        names=[r.name for r in refs],
        source=_class_name(type(module)),
        family=class_family(type(module)) or "",
        owner=module,
        gated=_is_gated(parent),
        module=module,
        refs=refs,
        constraint=_module_constraint(refs),
    )


def _attribute_sites(name: str, module: nn.Module) -> list[_Found]:
    """Activation functions stored as public attributes (timm's ``GammaAct.act_fn``)."""
    found = []
    for key, value in vars(module).items():
        if not key.startswith("_") and (info := function_info(value)) is not None:
            found.append(
                _Found(
                    kind="attribute",
                    names=[f"{name}.{key}" if name else key],
                    source=function_name(value),
                    family=info.family,
                    owner=module,
                    gated=_is_gated(module),
                    attribute=key,
                    constraint=class_constraints(type(module)).attributes.get(key),
                )
            )
    return found


def _functional_sites(name: str, module: nn.Module) -> list[_Found]:
    """Calls in the module's class source, except families its scope converts already."""
    scope = module.__dict__.get("forward")
    done = scope.families if isinstance(scope, FunctionalScope) else frozenset()
    sites = class_call_sites(type(module))
    calls = class_constraints(type(module)).calls if sites else {}
    return [
        _Found(
            kind="functional",
            names=[name],
            source=site.call,
            family=site.family,
            owner=module,
            where=f"{site.file}:{site.line} in {site.method}",
            constraint=calls.get((site.method, site.line)),
        )
        for site in sites
        if site.family not in done
    ]


def _string_sites(name: str, module: nn.Module) -> list[_Found]:
    """``activation=self.<attr>`` calls whose attribute names an activation: one site per
    attribute (the same one may be passed to several kernels)."""
    found: dict[str, _Found] = {}
    for site in class_string_sites(type(module)):
        family = string_site_family(module, site)
        if family is None or site.attribute in found:
            continue
        value = module.__dict__[site.attribute]
        found[site.attribute] = _Found(
            kind="string",
            names=[name],
            source=f"{site.keyword}={value!r}",
            family=family,
            owner=module,
            attribute=site.attribute,
            where=f"{site.file}:{site.line} in {site.method}",
        )
    return list(found.values())


def _check_model(model: object, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{function}() takes a torch nn.Module, got {type(model).__name__} {model!r:.60}"
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


@dataclass(frozen=True)
class _Options:
    """The selection options of plan / convert, checked once."""

    families: frozenset[str]
    positivity: bool  # the "positivity" opt-in of activations=
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    filter_fn: FilterFn | None


def _options(
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    filter_fn: FilterFn | None,
    activations: Iterable[str | type] | str | None,
) -> _Options:
    activations, positivity = _split_role(activations)
    if filter_fn is not None and not callable(filter_fn):
        raise InvalidArgumentError(
            f"filter_fn must be callable (module, name) -> bool, got {filter_fn!r}"
        )
    return _Options(
        resolve_families(activations),
        positivity,
        _patterns(include, "include"),
        _patterns(exclude, "exclude"),
        filter_fn,
    )


def _decide(item: _Found, opts: _Options) -> tuple[str, str]:
    """(stage, reason): stage "convert" or the stage that skipped the site.

    A positivity constraint (:mod:`serfswap.positivity`) is skipped unless ``positivity`` (the
    ``"positivity"`` opt-in of ``activations=``) or an include pattern names it explicitly.
    """
    if item.family == GATE:
        return "gate", "gate or normaliser, never replaced"
    if item.family not in opts.families:
        if item.family == "prelu":
            return "family", "has learned parameters; name 'prelu' in activations= to replace it"
        return "family", f"family {item.family!r} not selected (activations=)"
    if (
        item.constraint is not None
        and not opts.positivity
        and not _names_explicitly(item.names, opts.include)
    ):
        return ROLE, f"positivity constraint, {item.constraint}"
    if opts.include and _matches(item.names, opts.include) is None:
        return "include", "not matched by include="
    if opts.exclude and (pattern := _matches(item.names, opts.exclude)) is not None:
        return "exclude", f"excluded by {pattern!r}"
    if opts.filter_fn is not None and not opts.filter_fn(item.owner, item.names[0]):
        return "filter", "rejected by filter_fn"
    return "convert", ""


def _nothing_matched(
    model: str, stages: list[str], found: list[_Found], families: frozenset[str], **given: Any
) -> NothingToConvertError:
    error = _nothing_matched_why(model, stages, found, families, **given)
    kept = [
        n or "(root)" for f, s in zip(found, stages, strict=True) if s == ROLE for n in f.names[:1]
    ]
    if kept and "positivity constraint" not in str(error):
        base = error.template if error.values else _text(error.template)
        error = NothingToConvertError(
            f"{base}; also kept as positivity constraints: {_text(', '.join(kept[:3]))}"
            f"{', ...' if len(kept) > 3 else ''} (to convert them, name them in {{include}} or "
            f"add {ROLE!r} to {{activations}})",
            option=error.option or "activations",
            **{"include": NAMED, "activations": NAMED, **error.values},
        )
    return error


def _text(text: object) -> str:
    """Text from the model (names), literal in a message template."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _nothing_matched_why(
    model: str, stages: list[str], found: list[_Found], families: frozenset[str], **given: Any
) -> NothingToConvertError:
    """Why nothing is converted, naming the options (a template: the command line says them
    as flags, see SerfswapError)."""
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
    if ROLE in stages and all(s in ("family", "gate", ROLE) for s in stages):
        kept = [
            n or "(root)"
            for f, s in zip(found, stages, strict=True)
            if s == ROLE
            for n in f.names[:1]
        ]
        others = sorted({f.family for f, s in zip(found, stages, strict=True) if s == "family"})
        return NothingToConvertError(
            f"every activation of {model} that {{activations}} selects is a positivity constraint "
            f"({_text(', '.join(kept[:3]))}{', ...' if len(kept) > 3 else ''}: its output must "
            "stay non-negative, see {plan}); to convert them anyway, name them in {include} or "
            f"add {ROLE!r} to {{activations}}"
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
    if "family" in stages and all(s in ("family", "gate") for s in stages):
        return NothingToConvertError(
            f"{model} has activations of families {seen}, none of which is in "
            "{activations}; pass e.g. {seen:activations}",
            option="activations",
            activations=sorted(families),
            seen=seen,
        )
    examples = _text(", ".join(n for f in candidates[:3] for n in f.names[:1]))
    if "include" in stages and "exclude" not in stages and "filter" not in stages:
        return NothingToConvertError(
            f"{{include}} matched none of the {len(candidates)} activations of {model} (their "
            f"names look like: {examples})",
            option="include",
            include=list(given["include"]),
        )
    if "exclude" in stages and "filter" not in stages:
        return NothingToConvertError(
            f"{{exclude}} excluded every activation of {model} that {{include_:include}} and "
            f"{{activations}} left ({len(candidates)} found)",
            option="exclude",
            exclude=list(given["exclude"]),
            include_=NAMED,
            activations=NAMED,
        )
    return NothingToConvertError(
        f"filter_fn rejected every activation of {model} that the patterns left "
        f"({len(candidates)} found, e.g. {examples})",
        option="filter_fn",
    )


def _share_functional_skips(found: list[_Found], decisions: list[tuple[str, str]]) -> None:
    """Skip every functional call of a family in a module where one call of it is a kept
    positivity constraint: the scope that converts them works per module and family, not per
    call, so converting the others would convert the constraint too."""
    kept: dict[tuple[int, str], str] = {}
    for item, (stage, _) in zip(found, decisions, strict=True):
        if item.kind == "functional" and stage == ROLE:
            kept.setdefault((id(item.owner), item.family), item.where)
    for i, (item, (stage, _)) in enumerate(zip(found, decisions, strict=True)):
        where = kept.get((id(item.owner), item.family))
        if item.kind == "functional" and stage == "convert" and where is not None:
            decisions[i] = (
                ROLE,
                f"same module and function as the positivity constraint at {where} "
                "(functional calls are converted per module and function)",
            )


def _site(item: _Found, stage: str, reason: str, *, left: bool = False) -> Site:
    item.stage = stage
    return Site(
        name=item.names[0],
        kind=item.kind,
        source=item.source,
        family=item.family,
        convert=stage == "convert",
        reason=reason,
        gated=item.gated and stage == "convert",
        aliases=tuple(item.names[1:]),
        where=item.where,
        role=ROLE if item.constraint is not None else "",
        rule=item.constraint.rule if item.constraint is not None else "",
        left=left,
    )


def _plan(model: nn.Module, opts: _Options) -> tuple[Plan, list[tuple[_Found, Site]], bool]:
    """The static plan: every site the walk finds, each with its decision."""
    found, has_serf = _find(model)
    decisions = [_decide(item, opts) for item in found]
    _share_functional_skips(found, decisions)
    decided = [
        (item, _site(item, stage, reason))
        for item, (stage, reason) in zip(found, decisions, strict=True)
    ]
    plan = Plan(type(model).__name__, [site for _, site in decided])
    kept = sum(stage == ROLE for stage, _ in decisions)
    if kept:
        plan.notes.append(
            f"{kept} positivity constraint{'s' if kept > 1 else ''} kept (linear-attention feature "
            "maps, relu(x) + eps before a division, sqrt or log: Serf is negative below 0); to "
            f"convert, name them in include= (e.g. '*.kernel_func') or add {ROLE!r} to activations="
        )
    return plan, decided, has_serf


def _check_not_empty(
    plan: Plan,
    decided: list[tuple[_Found, Site]],
    has_serf: bool,
    opts: _Options,
    *,
    note_only: bool = False,
) -> None:
    """Raise NothingToConvertError when the plan converts nothing; with ``note_only`` (for
    :func:`plan`, which exists to show what would happen) the reason becomes a note."""
    if plan.converted:
        return
    if not has_serf:
        found = [item for item, _ in decided]
        stages = [item.stage for item in found]
        error = _nothing_matched(
            plan.model, stages, found, opts.families, include=opts.include, exclude=opts.exclude
        )
        if not note_only:
            raise error
        plan.notes.append(f"nothing to convert: {error}")
        return
    plan.notes.append("already converted: nothing left to convert with these options")


def _audit_inputs(
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
    opts = _options(include, exclude, filter_fn, activations)
    inputs, why = _audit_inputs(model, example_inputs, audit)
    if inputs is None:
        report, decided, has_serf = _plan(model, opts)
        _check_not_empty(report, decided, has_serf, opts, note_only=True)
        _not_audited(report, why)
        return report
    report = _convert(copy.deepcopy(model), opts, inputs, planning=True).__dict__[REPORT_ATTR]
    return replace(report, applied=False, config_updates={})


def _share_state(serf: Serf, original: nn.Module) -> None:
    """Give ``serf`` the very tables of the original's parameters and buffers (PReLU's weight).

    They stay in the converted model's ``state_dict`` under their keys, so a strict load into
    the original architecture works, and ``.to()`` / ``.double()`` / ``load_state_dict`` update
    the kept original too, so that :func:`revert` works after them.
    """
    if original._parameters or original._buffers:
        serf._parameters = original._parameters
        serf._buffers = original._buffers
        serf._non_persistent_buffers_set = original._non_persistent_buffers_set


def _apply(root: nn.Module, decided: list[tuple[_Found, Site]]) -> nn.Module:
    for item, site in decided:
        if not site.convert:
            continue
        if item.module is not None:
            serf = Serf(inplace=bool(getattr(item.module, "inplace", False)))
            serf.train(item.module.training)
            serf.__dict__[ORIGINAL_ATTR] = item.module
            _share_state(serf, item.module)
            if put(item.refs, serf):
                root = serf
        elif item.kind == "attribute":
            original = item.owner.__dict__[item.attribute]
            replacement = SerfFunction(original)
            if isinstance(item.owner, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
                # Their inference fast path runs a fused ReLU/GELU kernel when this flag is set.
                replacement.restore = {
                    "activation_relu_or_gelu": item.owner.activation_relu_or_gelu
                }
                item.owner.activation_relu_or_gelu = 0
            item.owner.__dict__[item.attribute] = replacement
        elif item.kind == "string":
            strings = item.owner.__dict__.setdefault(_STRINGS_ATTR, {})
            strings.setdefault(item.attribute, item.owner.__dict__[item.attribute])
            item.owner.__dict__[item.attribute] = NAME  # ACT2FN["serf"] is Serf
    _apply_scopes(decided)
    return root


def _apply_scopes(decided: list[tuple[_Found, Site]]) -> None:
    """Give each module with functional (or run-time) calls to convert a scope for their
    families; idempotent, so the run-time audit calls it again with the sites it adds."""
    scopes: dict[int, tuple[nn.Module, set[str]]] = {}
    for item, site in decided:
        if item.kind in ("functional", "run-time"):
            owner_families = scopes.setdefault(id(item.owner), (item.owner, set()))[1]
            if site.convert:
                owner_families.add(item.family)
    if not any(families for _, families in scopes.values()):
        return
    # Excluded owners get an empty scope, so a converted parent spares them; so do activation
    # modules left as they are (a kept feature map, an excluded ReLU): their forward calls
    # F.relu, which a converted ancestor's scope would otherwise turn into Serf.
    for item, site in decided:
        if item.module is not None and not site.convert and item.family != GATE:
            scopes.setdefault(id(item.module), (item.module, set()))
    for owner, families in scopes.values():
        current = owner.__dict__.get("forward")
        if isinstance(current, FunctionalScope):
            current.families = current.families | families
        else:
            owner.__dict__["forward"] = FunctionalScope(owner, frozenset(families))


def _same_line(a: str, b: str) -> bool:
    """Whether two ``file:line in function`` locations name the same line."""
    return bool(a) and a.split(" in ", 1)[0] == b.split(" in ", 1)[0]


def _run_time_decision(
    ran: run_time.Ran, decided: list[tuple[_Found, Site]], opts: _Options
) -> tuple[_Found, str, str] | None:
    """What to do with an activation the audit saw run: None when a static site already says
    (it is that site, or its module's decision for the family stands), else a run-time site
    with its (stage, reason)."""
    if (
        ran.kind == "module"
    ):  # an activation module of the model: the walk found it, the plan decided it
        return None
    statics = [
        (item, site)
        for item, site in decided
        if item.owner is ran.owner and item.family == ran.family
    ]
    if any(_same_line(item.where, ran.where) for item, _ in statics):
        return None
    item = _Found("run-time", [ran.name], ran.call, ran.family, ran.owner, where=ran.where)
    kept = next((site for _, site in statics if not site.convert), None)
    if kept is not None and kept.role:
        reason = (
            f"same module and function as the positivity constraint at {kept.where or kept.name}"
            " (functional calls are converted per module and function)"
        )
        return item, ROLE, reason
    if kept is not None:
        return None  # the module's own skip of this family (excluded, filtered...) covers it
    stage, reason = _decide(item, opts)
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


def _audit(
    root: nn.Module,
    decided: list[tuple[_Found, Site]],
    opts: _Options,
    inputs: dict[str, torch.Tensor],
    report: Plan,
) -> list[tuple[_Found, Site]]:
    """Reach the activations only a forward shows, then check that none that was to be
    converted still runs; returns ``decided`` with the run-time sites added."""
    recorder = _run_audit(root, inputs, report)
    if recorder is None:
        return decided
    added: list[tuple[_Found, Site]] = []
    for ran in recorder.ran:
        decision = _run_time_decision(ran, decided, opts)
        if decision is not None:
            item, stage, reason = decision
            if stage == "convert" and ran.kind == "built":  # no scope reaches what it computes
                stage, reason = "left", _LEFT + " (an activation module built during the forward)"
            added.append((item, _site(item, stage, reason, left=stage == "left")))
    decided = decided + added
    if any(site.convert for _, site in added):
        _apply_scopes(decided)
        recorder = _run_audit(root, inputs, report)
        if recorder is None:
            return decided
        for ran in recorder.ran:  # a second forward: what the scopes did not reach
            decision = _run_time_decision(ran, decided, opts)
            if decision is not None and decision[1] == "convert":
                item = decision[0]
                decided.append((item, _site(item, "left", _LEFT, left=True)))
    report.sites = [site for _, site in decided]
    report.audited = True
    return decided


_LEFT = "left: reached at run time only, still runs after conversion"


def _not_audited(report: Plan, why: str) -> None:
    """Say in ``report`` that the audit did not run because inputs could not be inferred."""
    if why:
        report.audit_error = why
        report.notes.append(
            f"not audited at run time: {why}; pass example_inputs= to check what still runs"
        )


def _convert(
    target: nn.Module,
    opts: _Options,
    inputs: dict[str, torch.Tensor] | None,
    why: str = "",
    *,
    planning: bool = False,
) -> nn.Module:
    """Convert ``target`` in place; its report is the root's ``serfswap_report``. With
    ``planning`` (a copy converted for :func:`plan`), converting nothing is a note, not an
    error."""
    report, decided, has_serf = _plan(target, opts)
    if inputs is None:
        _check_not_empty(report, decided, has_serf, opts, note_only=planning)
    root = _apply(target, decided)
    if inputs is not None:
        decided = _audit(root, decided, opts, inputs, report)
        try:
            _check_not_empty(report, decided, has_serf, opts, note_only=planning)
        except NothingToConvertError:
            revert(root)
            raise
    elif why:
        _not_audited(report, why)
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
    opts = _options(include, exclude, filter_fn, activations)
    inputs, why = _audit_inputs(model, example_inputs, True if strict else audit)
    if inputs is None and not inplace:  # nothing to convert costs no deep copy
        _check_not_empty(*_plan(model, opts), opts)
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
    root = model
    for serf, refs in converted_serfs(model):
        original = original_of(serf)
        if put(refs, original):
            root = original
    for _, module in walk(model)[1]:
        for key, value in list(vars(module).items()):
            if isinstance(value, SerfFunction):
                module.__dict__[key] = value.original
                for attr, old in value.restore.items():
                    setattr(module, attr, old)
            elif key == _STRINGS_ATTR:
                module.__dict__.update(value)
                del module.__dict__[key]
            elif key == "forward" and isinstance(value, FunctionalScope):
                if value.inner is None:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = value.inner
    report = model.__dict__.pop(REPORT_ATTR, None)
    if report is not None:
        integrations.restore_hf_config(model, report)
    return root
