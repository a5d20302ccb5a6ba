"""Positivity constraints: activations whose output must be non-negative for the model's math.

ReLU linear attention (timm's EfficientViT ``LiteMLA``) applies a ReLU *feature map* to the query
and the key and divides by ``q · sum(k)``; a learned scale or variance ``relu(x) + eps`` is divided
by, square-rooted or logged. Serf is negative below zero, so after a swap such a denominator can
reach zero or change sign: the model becomes unstable (EfficientViT's ONNX export then differs from
torch by 0.05 on outputs of size 1). These sites have a role of their own, ``positivity``: the
rewriter leaves them alone unless they are named explicitly (see :mod:`serfswap.convert`).

Three rules recognise them, tried in this order; the report names the rule that matched:

* ``known``: a table of library attributes that are feature maps (``KNOWN``), looked up by class
  identity along the MRO, like the activation tables. It holds what the other rules would also
  find, so that a refactor of the library's code cannot silently undo the protection.
* ``query-key``: in one method, the same activation (the same ``self.<attr>`` or the same
  function) is applied to a query and to a key. The query / key is recognised by the name of the
  argument or of the variable assigned: ``q``, ``query``, ``queries``, ``q_proj``, ``to_q``...
  (an underscore-separated token ``q`` / ``query`` / ``queries``, and ``k`` / ``key`` / ``keys``).
  A softmax attention never puts an activation on both; a kernelised one always does.
* ``denominator``: in one method, the activation's output reaches the denominator of a division
  (``/``, ``div``), or the argument of ``sqrt`` / ``rsqrt`` / ``log`` / ``reciprocal`` or of a
  power with a negative or fractional exponent. The output is followed through local variables
  and through what keeps the sign of a non-negative tensor (``+``, ``*``, ``@``, ``/``,
  indexing, ``sum`` / ``mean`` / ``cumsum``, reshapes, dtype casts, ``matmul`` / ``einsum``); it
  is *not* followed through a call of another module or of any other function, nor through
  ``-``, ``abs``, ``norm``, ``exp``, ``clamp``...: those either make any sign possible anyway or
  make the result non-negative whatever the input. So ``x / x.norm()`` after an MLP's activation
  is no match, ``var = relu(x) + eps; y / var.sqrt()`` is.

All three are static reads of the source of the classes that hold or call an activation: no
tracing, no example input, cached per class, deterministic. A division in *another* method (as in
``LiteMLA._attn``) is out of reach of ``denominator``; ``query-key`` and ``known`` cover that case.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .activations import TENSOR_METHODS, function_info
from .functional import UNRESOLVED, model_methods, resolve
from .where import where

ROLE = "positivity"  # the role of these sites, and the word that opts them in (activations=)

# module -> class name -> {attribute: why it must stay non-negative}
KNOWN: dict[str, dict[str, dict[str, str]]] = {
    "timm.models.efficientvit_mit": {
        "LiteMLA": {
            "kernel_func": "ReLU linear-attention feature map of q and k, divided by q·sum(k)"
        },
    },
}


@dataclass(frozen=True)
class Constraint:
    """Why one activation site must keep a non-negative output: the rule, what it saw, where."""

    rule: str  # "known", "query-key" or "denominator"
    detail: str
    where: str = ""  # "file.py:380 in LiteMLA.forward"

    def __str__(self) -> str:
        return f"rule {self.rule}: {self.detail}" + (f" [{self.where}]" if self.where else "")


_QUERY = frozenset({"q", "query", "queries"})
_KEY = frozenset({"k", "key", "keys"})
# Tensor methods and torch functions through which a non-negative value stays non-negative.
_KEEP_SIGN = frozenset(
    {
        "sum", "nansum", "mean", "cumsum", "transpose", "permute", "reshape", "view", "view_as",
        "flatten", "unflatten", "unsqueeze", "squeeze", "float", "double", "half", "bfloat16",
        "to", "type_as", "contiguous", "expand", "expand_as", "repeat", "clone", "chunk",
        "split", "matmul", "mul", "add", "bmm", "einsum", "cat", "stack", "pad", "div",
    }
)  # fmt: skip
_COMBINE = frozenset({"matmul", "mul", "add", "bmm", "einsum", "cat", "stack", "div"})
_SINKS = frozenset({"sqrt", "rsqrt", "log", "log2", "log10", "reciprocal"})
_SIGN_ATTRS = frozenset({"T", "mT", "mH", "data"})

# What an activation call in a method is: ("attr", name) for ``self.<name>(...)``, ("call",
# line) for a functional call.
Source = tuple[str, object]


@dataclass(frozen=True)
class ClassConstraints:
    """The positivity constraints a class's methods put on its activations."""

    attributes: dict[str, Constraint]  # self.<attr>(...) calls
    calls: dict[tuple[str, int], Constraint]  # functional calls by (method qualname, line)


def _tokens(name: str) -> set[str]:
    return {t for t in name.lower().split("_") if t}


def _role_name(node: ast.expr) -> str:
    """The name a value goes by: ``q``, ``self.q_proj(x)`` -> ``q_proj``, ``q.float()`` -> ``q``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript | ast.Starred):
        return _role_name(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        receiver = node.func.value
        if isinstance(receiver, ast.Name) and receiver.id == "self":
            return node.func.attr  # a projection module: self.q_proj(x)
        return _role_name(receiver)  # a tensor method: q.float()
    return ""


class _Signs:
    """What decides the sign of an expression in one method: the activation calls (sources) it
    is made of, followed through the method's local variables in source order."""

    def __init__(self, namespace: dict[str, object], first_line: int) -> None:
        self.namespace = namespace
        self.first_line = first_line
        self.taint: dict[str, frozenset[Source]] = {}

    def line(self, node: ast.AST) -> int:
        return self.first_line + getattr(node, "lineno", 1) - 1

    def source_of(self, call: ast.Call) -> tuple[Source, str] | None:
        """(source, callee as written) when ``call`` may apply an activation."""
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "self"
        ):
            return ("attr", func.attr), f"self.{func.attr}"
        obj = resolve(func, self.namespace)
        if obj is not UNRESOLVED and function_info(obj) is not None:
            return ("call", self.line(call)), ast.unparse(func)
        if obj is UNRESOLVED and isinstance(func, ast.Attribute) and func.attr in TENSOR_METHODS:
            return ("call", self.line(call)), f".{func.attr}()"
        return None

    def is_library(self, node: ast.expr) -> bool:
        obj = resolve(node, self.namespace)
        return obj is torch or obj is torch.nn.functional or getattr(obj, "__name__", "") == "math"

    def sources(self, node: ast.expr | None) -> frozenset[Source]:
        """The activation calls whose sign decides the sign of ``node``."""
        if node is None:
            return frozenset()
        if isinstance(node, ast.Name):
            return self.taint.get(node.id, frozenset())
        if isinstance(node, ast.Subscript):
            return self.sources(node.value)
        if isinstance(node, ast.Attribute):
            return self.sources(node.value) if node.attr in _SIGN_ATTRS else frozenset()
        if isinstance(node, ast.IfExp):
            return self.sources(node.body) | self.sources(node.orelse)
        if isinstance(node, ast.Tuple | ast.List):
            return frozenset().union(*(self.sources(e) for e in node.elts))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Add | ast.Mult | ast.MatMult | ast.Div):
                return self.sources(node.left) | self.sources(node.right)
            if isinstance(node.op, ast.Pow):
                return self.sources(node.left)
            return frozenset()
        if isinstance(node, ast.Call):
            found = self.source_of(node)
            if found is not None:
                return frozenset({found[0]})
            func = node.func
            if not isinstance(func, ast.Attribute) or func.attr not in _KEEP_SIGN:
                return frozenset()
            args = frozenset().union(*(self.sources(a) for a in node.args))
            if self.is_library(func.value):  # torch.sum(x), torch.matmul(a, b), F.pad(v, ...)
                return args
            receiver = self.sources(func.value)
            return receiver | args if func.attr in _COMBINE else receiver
        return frozenset()

    def assign(self, target: ast.expr, sources: frozenset[Source], value: ast.expr | None) -> None:
        if isinstance(target, ast.Name):
            self.taint[target.id] = sources
        elif isinstance(target, ast.Tuple | ast.List):
            if isinstance(value, ast.Tuple) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts, strict=True):
                    self.assign(t, self.sources(v), v)
            else:  # q, k, v = x.chunk(3): each part has the sign of the whole
                for t in target.elts:
                    self.assign(t, sources, None)


class _Uses(_Signs):
    """Where an activation's output is used: the sinks that need it non-negative (a division's
    denominator, sqrt, log, a root) and the names it is applied to (for ``query-key``)."""

    def __init__(self, namespace: dict[str, object], first_line: int) -> None:
        super().__init__(namespace, first_line)
        self.sinks: dict[Source, tuple[str, int]] = {}  # source -> (what, line)
        self.applied: dict[str, list[tuple[Source, set[str], int]]] = {}  # callee -> uses

    def sink(self, sources: frozenset[Source], what: str, node: ast.AST) -> None:
        for source in sources:
            self.sinks.setdefault(source, (what, self.line(node)))

    def check_sinks(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Div | ast.FloorDiv):
                self.sink(self.sources(sub.right), "the denominator of a division", sub)
            elif isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Pow):
                if _root_power(sub.right):
                    self.sink(self.sources(sub.left), "a negative or fractional power", sub)
            elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
                name = sub.func.attr
                library = self.is_library(sub.func.value)
                if name in _SINKS:
                    target = sub.args[0] if library and sub.args else sub.func.value
                    self.sink(self.sources(target), name, sub)
                elif name in ("div", "true_divide", "divide"):
                    args = sub.args[1:] if library else sub.args[:1]
                    if args:
                        self.sink(self.sources(args[0]), "the denominator of a division", sub)
                elif name == "pow" and sub.args and _root_power(sub.args[-1]):
                    target = sub.args[0] if library else sub.func.value
                    self.sink(self.sources(target), "a negative or fractional power", sub)
            elif isinstance(sub, ast.AugAssign) and isinstance(sub.op, ast.Div | ast.FloorDiv):
                self.sink(self.sources(sub.value), "the denominator of a division", sub)

    def note_applied(self, value: ast.expr, targets: list[ast.expr]) -> None:
        """Record which names each activation call is applied to (for ``query-key``)."""
        pairs: list[tuple[ast.expr, ast.expr | None]] = []
        if isinstance(value, ast.Tuple) and len(targets) == 1:
            target = targets[0]
            elts = target.elts if isinstance(target, ast.Tuple) else []
            for i, item in enumerate(value.elts):
                pairs.append((item, elts[i] if len(elts) == len(value.elts) else None))
        else:
            pairs.append((value, targets[0] if len(targets) == 1 else None))
        for node in (n for n in ast.walk(value) if isinstance(n, ast.Call)):
            pairs.append((node, None))  # nested calls too, without a target
        for expr, target in pairs:
            if not isinstance(expr, ast.Call):
                continue
            found = self.source_of(expr)
            if found is None:
                continue
            source, callee = found
            names = {_role_name(a) for a in expr.args[:1]}
            if target is not None and not isinstance(target, ast.Tuple):
                names.add(_role_name(target))
            self.applied.setdefault(callee, []).append((source, names, self.line(expr)))


class _MethodScan(_Uses):
    """One method's activation calls, followed through its local variables in source order."""

    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue  # nested definitions run elsewhere, if at all
            nested = [getattr(stmt, f) for f in ("body", "orelse", "finalbody") if hasattr(stmt, f)]
            nested += [h.body for h in getattr(stmt, "handlers", [])]
            headers = [
                getattr(stmt, f)
                for f in ("test", "iter", "value", "targets", "target", "msg", "exc", "items")
                if hasattr(stmt, f) and getattr(stmt, f) is not None
            ]
            if nested:
                for header in headers:
                    for item in header if isinstance(header, list) else [header]:
                        self.check_sinks(item)
            else:
                self.check_sinks(stmt)
            self._step(stmt)
            for block in nested:
                self.run(block)

    def _step(self, stmt: ast.stmt) -> None:
        """Follow one statement's assignments and activation calls (its own line only)."""
        if isinstance(stmt, ast.Assign):
            self.note_applied(stmt.value, stmt.targets)
            sources = self.sources(stmt.value)
            for target in stmt.targets:
                self.assign(target, sources, stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self.note_applied(stmt.value, [stmt.target])
            self.assign(stmt.target, self.sources(stmt.value), stmt.value)
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            self.note_applied(stmt.value, [stmt.target])
            if isinstance(stmt.op, ast.Add | ast.Mult | ast.MatMult | ast.Div):
                name = stmt.target.id
                self.taint[name] = self.taint.get(name, frozenset()) | self.sources(stmt.value)
            else:
                self.taint[stmt.target.id] = frozenset()
        elif isinstance(stmt, ast.Expr | ast.Return) and stmt.value is not None:
            self.note_applied(stmt.value, [])


def _root_power(node: ast.expr) -> bool:
    """A constant exponent that is negative or not an integer (a root or a reciprocal)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and isinstance(
            node.operand.value, int | float
        )
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, float)
        and not node.value.is_integer()
    )


def _methods(cls: type) -> Iterator[tuple[str, object]]:
    for method, fn in model_methods(cls):
        yield method, inspect.unwrap(fn)


def _known(cls: type) -> dict[str, Constraint]:
    found: dict[str, Constraint] = {}
    for module_name, classes in KNOWN.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for class_name, attributes in classes.items():
            klass = getattr(module, class_name, None)
            if isinstance(klass, type) and issubclass(cls, klass):
                for attr, why in attributes.items():
                    found.setdefault(attr, Constraint("known", why, f"{class_name}.{attr}"))
    return found


@functools.cache
def class_constraints(cls: type) -> ClassConstraints:
    """Every positivity constraint ``cls`` puts on the activations it holds or calls: the
    ``known`` table first, then what its source shows (:func:`source_constraints`)."""
    scanned = source_constraints(cls)
    return ClassConstraints({**scanned.attributes, **_known(cls)}, scanned.calls)


@functools.cache
def source_constraints(cls: type) -> ClassConstraints:
    """The constraints the rules ``query-key`` and ``denominator`` find in the methods of ``cls``
    (its MRO, torch's and transformers' infrastructure classes left out)."""
    attributes: dict[str, Constraint] = {}
    calls: dict[tuple[str, int], Constraint] = {}

    def record(method: str, source: Source, constraint: Constraint) -> None:
        kind, key = source
        if kind == "attr":
            attributes.setdefault(str(key), constraint)
        else:
            calls.setdefault((method, int(key)), constraint)  # type: ignore[call-overload]

    for method, fn in _methods(cls):
        try:
            lines, first_line = inspect.getsourcelines(fn)  # type: ignore[arg-type]
            file = inspect.getsourcefile(fn) or "?"  # type: ignore[arg-type]
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError):  # built-in or generated code: nothing to read
            continue
        body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
        scan = _MethodScan(getattr(fn, "__globals__", {}), first_line)
        scan.run(body)
        for callee, uses in scan.applied.items():
            queries = [u for u in uses if any(_tokens(n) & _QUERY for n in u[1])]
            keys = [u for u in uses if any(_tokens(n) & _KEY for n in u[1])]
            if queries and keys:
                at = where(file, min(u[2] for u in queries + keys), method)
                constraint = Constraint(
                    "query-key", f"{callee} applied to the query and the key", at
                )
                for source, _, _ in queries + keys:
                    record(method, source, constraint)
        for source, (what, line) in scan.sinks.items():
            constraint = Constraint(
                "denominator", f"output reaches {what}", where(file, line, method)
            )
            record(method, source, constraint)
    return ClassConstraints(attributes, calls)
