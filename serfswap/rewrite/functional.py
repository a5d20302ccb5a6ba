"""Functional activations: ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``, ``F.gelu(x)`` called
inside a module's own code, where no module walk can see them.

The design, and why:

* **Finding them: static analysis, per class.** The source of every method a model class defines
  (its MRO up to torch's own classes) is parsed with ``ast``; a call whose target resolves, in the
  method's globals, to a known activation function (``F.relu``, ``nn.functional.gelu``,
  ``torch.relu``, a ``from ... import relu``) or is a ``.relu()`` / ``.relu_()`` method call is a
  call site. This needs no example input and no tracing (transformers v5 has no FX tracer and many
  models do not trace), it names file and line for the report, and it is cached per class.
* **Converting them: a scoped interception.** A converted module's ``forward`` is replaced, on the
  instance, by a :class:`FunctionalScope` that runs the original forward inside a
  ``TorchFunctionMode`` mapping those functions to Serf. The mode is entered once, by the
  outermost scope, so it is active only while the model itself runs; which families it converts
  is a thread-local set each scope swaps in and restores, so a module that was excluded, nested
  inside one that was converted, keeps its original functions. Eager mode,
  ``torch.compile(fullgraph=True)`` and ``torch.export`` all respect the mode (tested).
  Nothing about the model's weights, state dict or class changes; ``revert`` removes the scope.
* **Functions stored as attributes** (timm's ``GammaAct.act_fn``, torch's
  ``TransformerEncoderLayer.activation``) are replaced by a :class:`SerfFunction` that keeps the
  original for ``revert``.

In-place variants (``relu_``, ``F.relu(x, inplace=True)``) keep their contract: the result is
written back into ``x``, from a copy when autograd needs the input.

Limits: a call in a free function outside the class (not a method) is not found statically; it
is still converted if it runs inside a converted module's forward (the scope covers callees), and
the run-time audit (:mod:`serfswap.audit`) finds it and asks for that scope.

**Activations chosen by a string** (``causal_conv1d_fn(x, w, activation=self.activation)`` with
``self.activation == "silu"`` in transformers' Mamba mixers) are a site kind of their own: the
class scan lists the ``activation=self.<attr>`` keywords of a model's methods; an instance whose
attribute names an activation family gets ``"serf"`` there (``ACT2FN["serf"]`` is Serf), so the
reference kernel builds Serf, and a compiled kernel that only knows "silu" fails loudly instead of
quietly running SiLU.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..ops.serf import serf
from .activations import (
    TENSOR_METHODS,
    TORCH_FUNCTIONS,
    FunctionInfo,
    activation_names,
    class_family,
    function_info,
    string_family,
)
from .where import file_name


@dataclass(frozen=True)
class CallSite:
    """One call of an activation function in a class's source."""

    call: str  # as written: "F.relu", ".relu()"
    method: str  # "MobileVitV2Attention.forward"
    file: str
    line: int
    family: str


def apply_serf(info: FunctionInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Serf in place of a call of an activation function, honouring its in-place contract."""
    x = args[0]
    inplace = info.always_inplace or bool(kwargs.get("inplace", False))
    if not inplace and info.inplace_arg is not None and len(args) > info.inplace_arg:
        inplace = bool(args[info.inplace_arg])
    if not inplace:
        return serf(x)
    # Serf keeps its input for backward: compute from a copy, then honour the in-place contract.
    source = x.clone() if torch.is_grad_enabled() and x.requires_grad else x
    return x.copy_(serf(source))


_STATE = threading.local()  # .families: the set the innermost running scope converts


class SerfDispatchMode(TorchFunctionMode):
    """Dispatches the activation functions of the running scope's families to Serf."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        families = getattr(_STATE, "families", None)
        if families:
            info = TORCH_FUNCTIONS.get(func)
            if info is not None and info.family in families:
                return apply_serf(info, args, kwargs)
        return func(*args, **kwargs)


class FunctionalScope:
    """Stands in for ``owner.forward``: runs it with the functional calls of ``families`` → Serf.

    ``families`` may be empty: a module excluded from the conversion, nested inside a converted
    one, keeps its own calls unchanged. ``__code__`` and ``__signature__`` are the original
    forward's, so ``torch.export`` sees the model's real signature.
    """

    def __init__(self, owner: nn.Module, families: frozenset[str]) -> None:
        self.owner = owner
        self.families = families
        self.inner: Callable[..., Any] | None = owner.__dict__.get("forward")

    def original(self) -> Callable[..., Any]:
        if self.inner is not None:
            return self.inner
        return type(self.owner).forward.__get__(self.owner)

    @property
    def __code__(self) -> Any:  # read by torch.export
        return self.original().__code__

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(_STATE, "families", None)
        _STATE.families = self.families
        try:
            if outer is None:  # the outermost scope: the mode lives as long as the model runs
                with SerfDispatchMode():
                    return self.original()(*args, **kwargs)
            return self.original()(*args, **kwargs)
        finally:
            _STATE.families = outer


class SerfFunction:
    """Serf standing in for an activation function stored as a module attribute.

    Its name is part of converted models' on-disk form: they pickle it, and
    :mod:`serfswap.safe_pickle` allows exactly ``serfswap.functional.SerfFunction``.
    """

    def __init__(self, original: Callable[..., Any]) -> None:
        info = function_info(original)
        if info is None:
            raise TypeError(f"{original!r} is not an activation function")
        self.original = original
        self.info = info
        self.restore: dict[str, Any] = {}  # owner attributes convert changed alongside, for revert

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return apply_serf(self.info, (x, *args), kwargs)

    def __repr__(self) -> str:
        return f"SerfFunction(replacing {function_name(self.original)})"


def function_name(fn: object) -> str:
    fn = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    short = {
        "torch.nn.functional": "F",
        "torch._C._nn": "F",
        "torch._C._VariableFunctions": "torch",
    }
    return f"{short.get(module, module)}.{name}" if module else name


UNRESOLVED = object()


def resolve(node: ast.expr, namespace: dict[str, Any]) -> object:
    """The object a ``Name`` / ``Attribute`` chain names in ``namespace``, if it is global."""
    if isinstance(node, ast.Name):
        if node.id in namespace:
            return namespace[node.id]
        return getattr(builtins, node.id, UNRESOLVED)
    if isinstance(node, ast.Attribute):
        base = resolve(node.value, namespace)
        if base is UNRESOLVED:
            return UNRESOLVED
        return getattr(base, node.attr, UNRESOLVED)
    return UNRESOLVED


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and lambdas
            names |= _code_names(const)
    return names


def _may_call_activation(fn: Callable[..., Any]) -> bool:
    """Whether the compiled code names an activation at all: reading and parsing source is 100x
    dearer, and most methods of a model class (init, loading helpers) never do."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return True
    names = _code_names(code)
    if names & activation_names():
        return True
    namespace = getattr(fn, "__globals__", {})
    return any(function_info(namespace.get(name)) is not None for name in names)


def _scan_function(fn: Callable[..., Any], method: str) -> list[CallSite]:
    fn = inspect.unwrap(fn)  # decorated forwards (transformers' @can_return_tuple...): the real one
    if not _may_call_activation(fn):
        return []
    try:
        lines, first_line = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or "?"
    except (OSError, TypeError):  # built-in or generated code: nothing to read
        return []
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return []
    namespace = getattr(fn, "__globals__", {})
    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = node.func
        obj = resolve(target, namespace)
        info = function_info(obj) if obj is not UNRESOLVED else None
        call = ast.unparse(target)
        if info is None and obj is UNRESOLVED and isinstance(target, ast.Attribute):
            info = TENSOR_METHODS.get(target.attr)  # x.relu(): a method on a local tensor
            call = f".{target.attr}()"
        if info is not None:
            line = first_line + node.lineno - 1
            sites.append(CallSite(call, method, file_name(file), line, info.family))
    return sites


def _is_infrastructure(klass: type) -> bool:
    """torch's own classes, and the loading / generation mixins of transformers: hundreds of
    methods, none of them a model's forward (skipping them makes a cold plan of BERT 20x faster).
    """
    module = klass.__module__
    if klass is object or module.split(".")[0] in ("torch", "huggingface_hub"):
        return True
    return module.startswith("transformers.") and not module.startswith("transformers.models.")


@functools.cache
def class_call_sites(cls: type) -> tuple[CallSite, ...]:
    """The activation calls in the methods a model class defines (torch's own classes and the
    activation classes themselves excluded: their calls are what they are)."""
    if class_family(cls) is not None:
        return ()
    return tuple(site for method, fn in model_methods(cls) for site in _scan_function(fn, method))


def model_methods(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    """(``Class.method``, function) for each function a model class defines along its MRO,
    static and class methods unwrapped, infrastructure classes (torch, transformers' mixins)
    left out: the code a model's own source scan reads."""
    for klass in cls.__mro__:
        if _is_infrastructure(klass):
            continue
        for name, attr in vars(klass).items():
            fn = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
            if inspect.isfunction(fn):
                yield f"{klass.__qualname__}.{name}", fn


STRING_KEYWORDS = frozenset({"activation"})  # keyword arguments that choose an activation by name


@dataclass(frozen=True)
class StringSite:
    """A call in a class's methods that passes an instance attribute as ``activation=``."""

    keyword: str  # "activation"
    attribute: str  # the attribute passed: ``self.activation`` -> "activation"
    method: str
    file: str
    line: int


def _keyword_names(code: types.CodeType) -> set[str]:
    """The keyword-argument names the compiled code may pass (nested code too): a plain call
    keeps them in a constant tuple, a call that also splats ``**kwargs`` builds a dict from
    string constants (``f(x, activation=self.activation, **kwargs)``, transformers 5.25's
    Mamba), so both count; the source is then read to be sure."""
    names: set[str] = set()
    for const in code.co_consts:
        if isinstance(const, str):
            names.add(const)
        elif isinstance(const, tuple):
            names.update(c for c in const if isinstance(c, str))
        elif isinstance(const, types.CodeType):
            names |= _keyword_names(const)
    return names


def _scan_strings(fn: Callable[..., Any], method: str) -> list[StringSite]:
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or not (_keyword_names(code) & STRING_KEYWORDS):
        return []
    try:
        lines, first_line = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or "?"
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return []
    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            value = keyword.value
            if (
                keyword.arg in STRING_KEYWORDS
                and isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and value.value.id == "self"
            ):
                line = first_line + node.lineno - 1
                sites.append(StringSite(keyword.arg, value.attr, method, file_name(file), line))
    return sites


@functools.cache
def class_string_sites(cls: type) -> tuple[StringSite, ...]:
    """The ``activation=self.<attr>`` keywords in the methods a model class defines (not
    ``__init__``: a string there configures a submodule, which the walk sees as a module)."""
    if class_family(cls) is not None:
        return ()
    return tuple(
        site
        for method, fn in model_methods(cls)
        if not method.endswith(".__init__")
        for site in _scan_strings(fn, method)
    )


def string_site_family(module: object, site: StringSite) -> str | None:
    """The family the instance's attribute names, if it is a string naming an activation."""
    value = getattr(module, "__dict__", {}).get(site.attribute)
    return string_family(value) if isinstance(value, str) else None
