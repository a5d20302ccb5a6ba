"""The site finders: every place in a model where an activation is, found by reading it.

Five kinds, one finder each: activation modules (``module``, or ``norm-act`` inside a fused
norm+act layer such as timm's ``BatchNormAct2d.act``), activation functions stored as attributes
(``attribute``), and, from the sites :mod:`serfswap.rewrite.functional` reads in a module's
code, functional calls (``functional``) and activations chosen by a string (``string``). What
only a forward shows is the run-time audit's (:mod:`serfswap.rewrite.audit_merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..ops.serf import Serf
from .activations import class_family, function_info
from .functional import (
    FunctionalScope,
    SerfFunction,
    class_call_sites,
    class_string_sites,
    function_name,
    string_site_family,
)
from .positivity import Constraint, class_constraints
from .walk import Ref, walk
from .where import where

STRINGS_ATTR = "_serfswap_strings"  # {attribute: original name} of converted string sites

# Children that make an MLP gated (LLaMA / Mistral / Gemma, Phi-3, T5 v1.1, Mixtral experts).
_GATE_PROJECTIONS = frozenset({"gate_proj", "gate_up_proj", "wi_0", "w1", "w3"})


@dataclass
class Found:
    """A site found by the walk (or the audit), with what convert needs to change it."""

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
    constraint: Constraint | None = None  # a positivity constraint (serfswap.rewrite.positivity)
    stage: str = ""  # what the plan decided: a Decision (serfswap.rewrite.selection)


def find(root: nn.Module) -> tuple[list[Found], bool]:
    """All activation sites of ``root``, and whether it already holds serfswap's Serf."""
    refs, order = walk(root)
    found: list[Found] = []
    has_serf = False
    for name, module in order:
        if isinstance(module, Serf):
            has_serf = True
        elif class_family(type(module)) is not None:
            found.append(module_site(module, refs[id(module)]))
        else:
            has_serf |= _holds_serf(module)
            found.extend(attribute_sites(name, module))
            found.extend(string_sites(name, module))
            found.extend(functional_sites(name, module))
    return found, has_serf


def _holds_serf(module: nn.Module) -> bool:
    """Whether convert already changed this module's attributes, strings or forward."""
    return bool(module.__dict__.get(STRINGS_ATTR)) or any(
        isinstance(value, SerfFunction | FunctionalScope) for value in vars(module).values()
    )


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


def _module_constraint(refs: list[Ref]) -> Constraint | None:
    """The positivity constraint any parent that calls this activation module puts on it."""
    for ref in refs:
        if ref.parent is not None:
            found = class_constraints(type(ref.parent)).attributes.get(ref.key)
            if found is not None:
                return found
    return None


def module_site(module: nn.Module, refs: list[Ref]) -> Found:
    """An activation module, under every name that holds it: kind ``norm-act`` in a fused
    norm+act layer, else ``module``."""
    parent = refs[0].parent
    return Found(
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


def attribute_sites(name: str, module: nn.Module) -> list[Found]:
    """Activation functions stored as public attributes (timm's ``GammaAct.act_fn``)."""
    found = []
    for key, value in vars(module).items():
        if not key.startswith("_") and (info := function_info(value)) is not None:
            found.append(
                Found(
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


def functional_sites(name: str, module: nn.Module) -> list[Found]:
    """Calls in the module's class source, except families its scope converts already."""
    scope = module.__dict__.get("forward")
    done = scope.families if isinstance(scope, FunctionalScope) else frozenset()
    sites = class_call_sites(type(module))
    calls = class_constraints(type(module)).calls if sites else {}
    return [
        Found(
            kind="functional",
            names=[name],
            source=site.call,
            family=site.family,
            owner=module,
            where=where(site.file, site.line, site.method),
            constraint=calls.get((site.method, site.line)),
        )
        for site in sites
        if site.family not in done
    ]


def string_sites(name: str, module: nn.Module) -> list[Found]:
    """``activation=self.<attr>`` calls whose attribute names an activation: one site per
    attribute (the same one may be passed to several kernels)."""
    found: dict[str, Found] = {}
    for site in class_string_sites(type(module)):
        family = string_site_family(module, site)
        if family is None or site.attribute in found:
            continue
        value = module.__dict__[site.attribute]
        found[site.attribute] = Found(
            kind="string",
            names=[name],
            source=f"{site.keyword}={value!r}",
            family=family,
            owner=module,
            attribute=site.attribute,
            where=where(site.file, site.line, site.method),
        )
    return list(found.values())
