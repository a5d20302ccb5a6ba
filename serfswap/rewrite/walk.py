"""The walk over a module tree, and the verbs convert, revert and recovery use on it.

It recurses over ``_modules`` (not ``named_modules()``, which visits a shared instance once)
and records every (parent, key) that holds each instance, so a module shared by several parents
is replaced in all of them at once, and one shared Serf stays one shared Serf.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..ops.serf import Serf

ORIGINAL_ATTR = "_serfswap_original"  # in a converted Serf's __dict__: the module it replaced


@dataclass
class Ref:
    """One place that holds a module instance: ``parent._modules[key]``, named ``name``."""

    parent: nn.Module | None  # None: the root itself
    key: str
    name: str


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
    """The module :func:`~serfswap.convert` replaced with ``serf``; None for anything else (a
    Serf the user put in, or not a Serf at all)."""
    return serf.__dict__.get(ORIGINAL_ATTR) if isinstance(serf, Serf) else None


def converted_serfs(model: nn.Module) -> list[tuple[Serf, list[Ref]]]:
    """Each Serf :func:`~serfswap.convert` put into ``model``, once, with every place that
    holds it."""
    refs, order = walk(model)
    return [(m, refs[id(m)]) for _, m in order if original_of(m) is not None]
