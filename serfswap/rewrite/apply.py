"""Apply a plan: the only code that changes a model's activations.

Each Serf keeps the module it replaced (unregistered, so it is in neither ``state_dict`` nor
``named_modules``), which is what lets :func:`~serfswap.revert` restore the original objects and
their bit-identical outputs; a function attribute becomes a :class:`SerfFunction` that keeps the
original, a string site's original name is kept under ``STRINGS_ATTR``, and functional calls
run under a :class:`FunctionalScope` on their module's ``forward``.
"""

from __future__ import annotations

from torch import nn

from ..ops.serf import Serf
from .activations import GATE
from .configs import NAME
from .functional import FunctionalScope, SerfFunction
from .report import Site
from .sites import STRINGS_ATTR, Found
from .walk import ORIGINAL_ATTR, converted_serfs, original_of, put, walk


def apply(root: nn.Module, decided: list[tuple[Found, Site]]) -> nn.Module:
    """Convert every site of ``decided`` that the plan converts; returns the (possibly new)
    root, which is a Serf when the root itself was the activation."""
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
            strings = item.owner.__dict__.setdefault(STRINGS_ATTR, {})
            strings.setdefault(item.attribute, item.owner.__dict__[item.attribute])
            item.owner.__dict__[item.attribute] = NAME  # ACT2FN["serf"] is Serf
    apply_scopes(decided)
    return root


def _share_state(serf: Serf, original: nn.Module) -> None:
    """Give ``serf`` the very tables of the original's parameters and buffers (PReLU's weight).

    They stay in the converted model's ``state_dict`` under their keys, so a strict load into
    the original architecture works, and ``.to()`` / ``.double()`` / ``load_state_dict`` update
    the kept original too, so that :func:`~serfswap.revert` works after them.
    """
    if original._parameters or original._buffers:
        serf._parameters = original._parameters
        serf._buffers = original._buffers
        serf._non_persistent_buffers_set = original._non_persistent_buffers_set


def apply_scopes(decided: list[tuple[Found, Site]]) -> None:
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


def unapply(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` everywhere in ``model``; returns the (possibly new) root."""
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
            elif key == STRINGS_ATTR:
                module.__dict__.update(value)
                del module.__dict__[key]
            elif key == "forward" and isinstance(value, FunctionalScope):
                if value.inner is None:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = value.inner
    return root
