"""Which modules and functions count as activations, which family each belongs to, and which are
gates that must never be replaced.

Classes are recognised by identity, walking the MRO, so subclasses (timm's ``PReLU``) inherit
their base's family. timm and transformers classes are looked up in ``sys.modules`` only: a model
that holds a timm module has imported timm already, and ``import serfswap`` stays cheap.

Families: ``DEFAULT_FAMILIES`` (the ReLU / GELU / Swish / Mish family) are converted unless the
caller says otherwise; the others (``relu6``, ``leaky_relu``, ``elu``, ``celu``, ``selu``,
``hardswish``, ``hardmish``, ``relu_squared``, ``gelu_clipped``, ``prelu``, ``rrelu``) only when
named in ``activations=``. ``prelu`` carries learned parameters, which the swap drops.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NAMED, InvalidActivationsError
from ..ops.serf import Serf

DEFAULT_FAMILIES = frozenset({"relu", "gelu", "silu", "mish"})
OPTIONAL_FAMILIES = frozenset(
    {
        "relu6",
        "leaky_relu",
        "elu",
        "celu",
        "selu",
        "hardswish",
        "hardmish",
        "relu_squared",
        "gelu_clipped",
        "prelu",
        "rrelu",
    }
)
ALL_FAMILIES = DEFAULT_FAMILIES | OPTIONAL_FAMILIES
GATE = "gate"  # sigmoid-like and normalising functions: never replaced

_TORCH_CLASSES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.Hardswish: "hardswish",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.Sigmoid: GATE,
    nn.Hardsigmoid: GATE,
    nn.Tanh: GATE,
    nn.Softmax: GATE,
    nn.Softmax2d: GATE,
    nn.LogSoftmax: GATE,
    nn.Softmin: GATE,
    nn.GLU: GATE,
    nn.LogSigmoid: GATE,
}

# Names looked up in the modules of optional libraries, when those are imported.
_LIBRARY_CLASSES: dict[str, dict[str, str]] = {
    "timm.layers.activations": {
        "Swish": "silu",
        "Mish": "mish",
        "GELU": "gelu",
        "GELUTanh": "gelu",
        "QuickGELU": "gelu",
        "HardSwish": "hardswish",
        "HardMish": "hardmish",
        "Sigmoid": GATE,
        "Tanh": GATE,
        "HardSigmoid": GATE,
    },
    "timm.layers.activations_me": {
        "SwishMe": "silu",
        "MishMe": "mish",
        "HardSwishMe": "hardswish",
        "HardMishMe": "hardmish",
        "HardSigmoidMe": GATE,
    },
    "transformers.activations": {
        "GELUActivation": "gelu",
        "NewGELUActivation": "gelu",
        "FastGELUActivation": "gelu",
        "QuickGELUActivation": "gelu",
        "GELUTanh": "gelu",
        "PytorchGELUTanh": "gelu",
        "AccurateGELUActivation": "gelu",
        "ClippedGELUActivation": "gelu_clipped",
        "SiLUActivation": "silu",
        "MishActivation": "mish",
        "ReLUSquaredActivation": "relu_squared",
    },
    # Model-specific hand-written GELUs (the only ones in transformers 5).
    "transformers.models.bloom.modeling_bloom": {"BloomGelu": "gelu"},
    "transformers.models.lxmert.modeling_lxmert": {"GeLU": "gelu"},
}


@dataclass(frozen=True)
class FunctionInfo:
    """A functional activation: its family and how it signals in-place operation."""

    family: str
    inplace_arg: int | None = None  # position of an ``inplace`` argument, if it has one
    always_inplace: bool = False  # relu_ and friends


TORCH_FUNCTIONS: dict[Callable[..., object], FunctionInfo] = {
    F.relu: FunctionInfo("relu", 1),
    torch.relu: FunctionInfo("relu"),
    torch.Tensor.relu: FunctionInfo("relu"),
    F.relu_: FunctionInfo("relu", always_inplace=True),
    torch.relu_: FunctionInfo("relu", always_inplace=True),
    torch.Tensor.relu_: FunctionInfo("relu", always_inplace=True),
    F.gelu: FunctionInfo("gelu"),
    F.silu: FunctionInfo("silu", 1),
    F.mish: FunctionInfo("mish", 1),
    F.relu6: FunctionInfo("relu6", 1),
    F.leaky_relu: FunctionInfo("leaky_relu", 2),
    F.leaky_relu_: FunctionInfo("leaky_relu", always_inplace=True),
    F.elu: FunctionInfo("elu", 2),
    F.elu_: FunctionInfo("elu", always_inplace=True),
    F.celu: FunctionInfo("celu", 2),
    F.selu: FunctionInfo("selu", 1),
    F.hardswish: FunctionInfo("hardswish", 1),
}

_LIBRARY_FUNCTIONS: dict[str, dict[str, str]] = {
    "timm.layers.activations": {
        "swish": "silu",
        "mish": "mish",
        "gelu": "gelu",
        "gelu_tanh": "gelu",
        "quick_gelu": "gelu",
        "hard_swish": "hardswish",
        "hard_mish": "hardmish",
    },
    "timm.layers.activations_me": {
        "swish_me": "silu",
        "mish_me": "mish",
        "hard_swish_me": "hardswish",
        "hard_mish_me": "hardmish",
    },
}

# Method names of torch.Tensor that are activations: ``x.relu()`` in a forward.
TENSOR_METHODS: dict[str, FunctionInfo] = {
    "relu": TORCH_FUNCTIONS[torch.Tensor.relu],
    "relu_": TORCH_FUNCTIONS[torch.Tensor.relu_],
}


def _library_table(kind: str) -> dict[object, str]:
    """The ``kind`` ("classes" or "functions") of the optional libraries imported by now."""
    tables = _LIBRARY_CLASSES if kind == "classes" else _LIBRARY_FUNCTIONS
    return _table_for(kind, tuple(name for name in tables if name in sys.modules))


@functools.cache  # per set of imported libraries: a walk asks once per module of a model
def _table_for(kind: str, loaded: tuple[str, ...]) -> dict[object, str]:
    tables = _LIBRARY_CLASSES if kind == "classes" else _LIBRARY_FUNCTIONS
    found: dict[object, str] = {}
    for module_name in loaded:
        module = sys.modules[module_name]
        for name, family in tables[module_name].items():
            obj = getattr(module, name, None)
            if obj is not None:
                found[obj] = family
    return found


@functools.cache  # asked once per method scanned; the tables are fixed
def activation_names() -> frozenset[str]:
    """Every name an activation function or method goes by, for a cheap pre-filter of code."""
    names = {getattr(fn, "__name__", "") for fn in TORCH_FUNCTIONS}
    for table in _LIBRARY_FUNCTIONS.values():
        names.update(table)
    return frozenset(names | set(TENSOR_METHODS))


def class_family(cls: type) -> str | None:
    """The family of an activation class (``"gate"`` for gates), or None if it is not one."""
    if issubclass(cls, Serf):
        return None
    library = _library_table("classes")
    for base in cls.__mro__:
        family = library.get(base) or _TORCH_CLASSES.get(base)
        if family is not None:
            return family
    return None


def function_info(fn: object) -> FunctionInfo | None:
    """What a function object is, if it is a functional activation (partials included)."""
    if isinstance(fn, functools.partial):
        fn = fn.func
    try:
        info = TORCH_FUNCTIONS.get(fn)  # type: ignore[call-overload]
    except TypeError:  # unhashable
        return None
    if info is not None:
        return info
    family = _library_table("functions").get(fn)
    return FunctionInfo(family, 1) if family is not None else None


# Activation names as strings (transformers' ACT2FN keys, ``activation="silu"`` arguments), for
# when transformers is not imported; with it, its ACT2CLS table decides.
_STRING_FAMILIES = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "mish": "mish"}


def string_family(name: str) -> str | None:
    """The family an activation's name stands for (``"swish"`` -> ``"silu"``), or None."""
    act2cls = getattr(sys.modules.get("transformers.activations"), "ACT2CLS", None)
    entry = act2cls.get(name) if act2cls is not None else None
    if entry is None:
        family = _STRING_FAMILIES.get(name)
    else:
        family = class_family(entry[0] if isinstance(entry, tuple) else entry)
    return family if family != GATE else None


def resolve_families(activations: Iterable[str | type] | str | None) -> frozenset[str]:
    """The families a caller asked for: None is the default set, ``"all"`` every family."""
    if activations is None:
        return DEFAULT_FAMILIES
    if isinstance(activations, str):
        activations = [activations]
    if not isinstance(activations, Iterable):
        raise InvalidActivationsError(
            "{activations} takes a family name, a class or a list of them, got "
            + repr(activations).replace("{", "{{").replace("}", "}}"),
            option="activations",
            activations=NAMED,
        )
    families: set[str] = set()
    for item in activations:
        if item == "all":
            families |= ALL_FAMILIES
        elif isinstance(item, str) and item in ALL_FAMILIES:
            families.add(item)
        elif isinstance(item, type) and (family := class_family(item)) not in (None, GATE):
            families.add(family)  # type: ignore[arg-type]
        else:
            known = ", ".join(sorted(ALL_FAMILIES))
            raise InvalidActivationsError(
                "{activations} is not an activation family or class serfswap can replace; use "
                f"'all' or any of: {known}",
                option="activations",
                activations=item,
            )
    return frozenset(families)
