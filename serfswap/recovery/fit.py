"""Fitting each Serf to the activation it replaced, before recovery trains anything.

Serf is not GELU or SiLU at the same scale: on all-MiniLM-L6-v2's pre-activations, swapping
GELU for Serf leaves a mean squared error of 41% of the activation's variance, and the held-out
embedding cosine falls to 0.51. But Serf at another scale, ``a * Serf(b * x)`` with
``b ~ 1.75, a ~ 0.49``, is within 1% of GELU there (``Serf(b x)`` has its knee where GELU has
its for that ``b``), and within 0.4% with one pair per channel, fitted to each unit's own
inputs. The scales fold into the neighbouring layers with no change to the graph: ``b`` into
the layer that produces the activation's input (a Linear's or convolution's weight and bias, a
norm's affine parameters), ``a`` into the layer(s) that consume its output (their weights; a
bias is not scaled), or, in a gated MLP such as LLaMA's ``down(act(gate(x)) * up(x))``, into
the other factor's layer (``up``). Per channel, each scale goes to its row or column of those
weights; where the channels are not the activation's last dimension (convolutions), one pair
serves all. The model keeps plain Serf activations and the exported file is unchanged in shape;
the fit takes seconds and gives recovery a start that is most of the way there (MiniLM: cosine
0.51 -> 0.997 before one step; see docs/recovery.md).

How: the converted model runs a few calibration batches with the original activations put back
(it is then the original model, weights unchanged), recording each activation's inputs. For
each converted Serf, ``b`` is searched on a grid in [``B_RANGE``] and ``a`` solved in closed
form, minimising the mean squared error to the original activation over those inputs. The
producer and consumers are found by tensor identity in one forward pass (the module whose
output *is* the activation's input, those whose input *is* its output). Every fold is then
checked: the folded model must compute what the unfolded one computes with each Serf replaced
by ``a * Serf(b * x)`` (scale-aware tolerance); a fold that does not (the producer's output also
used elsewhere, a residual that bypasses the consumer) is undone, and that Serf keeps a = b = 1.
A Serf held in more than one place, or with no producer or consumer to fold into, is left as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..modes import eval_mode
from ..ops.serf import Serf, serf
from ..rewrite.walk import converted_serfs, original_of, put

# The input scales searched. Wide enough for GELU (1.75 for one scale; 0.6 to 2.5 per channel
# on MiniLM) and SiLU; bounded above so that a ReLU's fit stays a smooth Serf and does not
# turn into a ReLU (Serf(b x) / b -> ReLU as b grows).
B_RANGE = (0.5, 2.5)
_GRID = 81
# Pre-activation values per Serf the fit is computed on: whole rows of channels for a fit per
# channel (all the rows up to that budget: 16 MB of float32 each), values for one scale.
_SAMPLES = 1 << 22
_LINEAR_IN_INPUT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NEAR = 8  # modules run before or after an activation looked at for a gate's other factor


@dataclass
class Fit:
    """One Serf's fit: ``a * Serf(b * x)`` in place of the original activation. ``error`` and
    ``error_plain``: mean squared error to the original activation over its recorded inputs,
    relative to the variance of its output, with the fit and with plain Serf. ``folded``:
    whether the scales are in the model's weights (False: left out, with ``reason``).
    ``holder``: the module that holds the Serf (the layer recovery matches), and
    ``holder_scale``: what the student's output of it is multiplied by to compare with the
    original's (``a`` when that output is the Serf's own, whose ``a`` went into a layer
    outside it, as BertIntermediate's; 1 otherwise, as LLaMA's MLP, which holds ``up``)."""

    name: str
    a: Tensor  # 0-d (one scale for the activation) or one per channel (its last dimension)
    b: Tensor
    error: float
    error_plain: float
    folded: bool = False
    reason: str = ""
    holder: str = ""
    holder_scale: Tensor | None = None


def fit_activations(model: nn.Module, batches: Iterable[Any], device: torch.device) -> list[Fit]:
    """Fit and fold every converted Serf of ``model`` in place; one :class:`Fit` per Serf.

    ``batches``: calibration batches in the form recovery takes (the first one also finds the
    producers and consumers and checks the folds)."""
    from .distill import split_batch, to_device

    serfs = converted_serfs(model)
    if not serfs:
        return []
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    calls = [split_batch(to_device(batch, device))[:2] for batch in batches]
    if not calls:
        return []
    with eval_mode(model), torch.no_grad():
        sites, passing = _sites(model, serfs, calls[0])
        channels = {k: _channels(site) for k, site in sites.items() if not isinstance(site, str)}
        inputs, dtype = _original_inputs(model, serfs, calls, channels)
        fits: list[Fit] = []
        one = torch.tensor(1.0)
        for serf_module, refs in serfs:
            name = names.get(id(serf_module), "?")
            x = inputs.get(id(serf_module))
            if x is None:
                fits.append(Fit(name, one, one, 0.0, 0.0, reason="not run by the batches"))
                continue
            fits.append(_fit_one(name, original_of(serf_module), x))
            if len(refs) > 1:
                fits[-1].reason = "held in more than one place"
        plans = {}
        for fit, (serf_module, _) in zip(fits, serfs, strict=True):
            if fit.reason:
                continue
            plan = sites.get(id(serf_module))
            if isinstance(plan, str):
                fit.reason = plan
            elif fit.error >= fit.error_plain:
                fit.reason = "the fit is no better than plain Serf"
            else:
                plans[id(serf_module)] = (fit, serf_module, plan)
        # Equal up to float reassociation: 1e-4 of the output's scale in float32, a few
        # rounding steps of the passes' precision under bfloat16 (autocast, FSDP's
        # mixed precision); a wrong fold is off by tens of percent.
        tolerance = max(1e-4, 4 * torch.finfo(dtype).eps)
        _fold_checked(model, list(plans.values()), calls[0], tolerance)
    for fit, (serf_module, refs) in zip(fits, serfs, strict=True):
        fit.holder = refs[0].name.rpartition(".")[0]
        if fit.folded and id(serf_module) in passing:
            fit.holder_scale = fit.a
    return fits


def holder_scales(fits: list[Fit]) -> dict[str, float | list[float]]:
    """``holder -> holder_scale`` (a float, or one per channel of the last dimension) where
    there is one: what layer matching multiplies the student's output of those modules by
    (see :class:`Fit`); plain data, kept in checkpoints."""
    return {f.holder: f.holder_scale.tolist() for f in fits if f.holder_scale is not None}


def _channels(site: list) -> int | None:
    """The number of channels when every layer of ``site`` can take one scale per channel of
    the activation's last dimension (Linears, transformers' Conv1D, a norm's 1-d affine
    parameters as the producer: what transformer MLPs are made of); None for one scale for
    all (convolutions, whose channels are not last)."""
    sizes = set()
    for module, which, with_bias in site:
        output_side = which == "b" or with_bias  # the producer, or a gate's other factor
        weight = module.weight
        if isinstance(module, nn.Linear):
            sizes.add(weight.shape[0 if output_side else 1])
        elif type(module).__name__ == "Conv1D":
            sizes.add(weight.shape[1 if output_side else 0])
        elif which == "b" and weight.dim() == 1:
            sizes.add(weight.shape[0])
        else:
            return None
    return sizes.pop() if len(sizes) == 1 else None


def _original_inputs(
    model: nn.Module, serfs: list[tuple[Serf, list]], calls: list, channels: dict[int, int | None]
) -> tuple[dict[int, Tensor], torch.dtype]:
    """Samples of each converted Serf's input with the original activations put back (the
    model is then the original): ``id(serf) -> float32 tensor``, rows of the last dimension
    where ``channels`` gives its size (a fit per channel), else 1-d; and the lowest floating
    precision those inputs came in (the passes' precision)."""
    found: dict[int, list[Tensor]] = {}
    dtypes = {torch.float32}
    handles = []
    for serf_module, refs in serfs:
        original = original_of(serf_module)
        put(refs, original)

        def record(module: nn.Module, args: tuple, key: int = id(serf_module)) -> None:
            if args and isinstance(args[0], Tensor):
                dtypes.add(args[0].dtype)
                x = args[0].detach().float().cpu()
                size = channels.get(key)
                rows = x.reshape(-1, size) if size and x.shape[-1] == size else x.reshape(-1)
                found.setdefault(key, []).append(rows)

        handles.append(original.register_forward_pre_hook(record))
    try:
        for args, kwargs in calls:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for serf_module, refs in serfs:
            put(refs, serf_module)
    generator = torch.Generator().manual_seed(0)
    samples = {}
    for key, parts in found.items():
        if len({p.dim() for p in parts}) > 1:  # some calls not per channel: one scale
            parts = [p.reshape(-1) for p in parts]
        x = torch.cat(parts)
        rows = max(_SAMPLES // x[0].numel(), 1) if x.dim() == 2 else _SAMPLES
        if len(x) > rows:
            x = x[torch.randint(0, len(x), (rows,), generator=generator)]
        samples[key] = x
    floats = [d for d in dtypes if d.is_floating_point]
    return samples, max(floats, key=lambda d: torch.finfo(d).eps)


def _fit_one(name: str, original: nn.Module, x: Tensor) -> Fit:
    """The (a, b) of least squared error to ``original`` over ``x``: b on a grid, a solved;
    one pair per column when ``x`` is rows of channels, one for all when it is 1-d."""
    y = original(x)
    variance = float(y.var()) or 1.0
    dim = 0 if x.dim() == 2 else None
    shape = x.shape[1:] if dim == 0 else ()
    best_error = (serf(x) - y).square().mean(dim)  # plain Serf's, per channel or for all
    plain = float(best_error.mean()) / variance
    best_a, best_b = torch.ones(shape), torch.ones(shape)
    for b in torch.linspace(*B_RANGE, _GRID).tolist():
        f = serf(b * x)
        a = (f * y).sum(dim) / f.square().sum(dim).clamp_min(1e-30)
        error = (a * f - y).square().mean(dim)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
    return Fit(name, best_a, best_b, float(best_error.mean()) / variance, plain)


def _has_affine_weight(module: nn.Module) -> bool:
    """A module whose output scales with its ``weight`` and ``bias`` together (a Linear, a
    convolution, transformers' Conv1D, an affine norm): its own parameters are those two."""
    own = dict(module.named_parameters(recurse=False))
    return "weight" in own and set(own) <= {"weight", "bias"}


def _sites(model: nn.Module, serfs: list[tuple[Serf, list]], call: tuple) -> tuple[dict, set]:
    """Where each Serf's scales fold, found in one forward pass by tensor identity:
    ``id(serf) -> [(module, scale, with_bias)]`` (``"b"`` for the module producing its input,
    weight and bias; ``"a"`` for those consuming its output, weight only, or for a gate's
    other factor, weight and bias), or the reason there is none; and the ids of the Serfs
    whose holder's output is the Serf's output."""
    made: list[tuple[nn.Module, Tensor]] = []  # (module, its output), in call order
    taken: list[tuple[nn.Module, Tensor, int]] = []  # (module, its first input, len(made))
    serf_io: dict[int, list[tuple[Tensor, Tensor, int]]] = {}
    wanted = {id(m) for m, _ in serfs} | {id(refs[0].parent) for _, refs in serfs}
    handles = []

    def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
        return next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = first_tensor(args, kwargs)
        if found is not None:
            taken.append((module, found, len(made)))

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if isinstance(output, Tensor):
            if id(module) in wanted:
                serf_io.setdefault(id(module), []).append(
                    (first_tensor(args, kwargs), output, len(made)))  # fmt: skip
            made.append((module, output))

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        model(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    sites: dict[int, Any] = {}
    passing = set()
    for serf_module, refs in serfs:
        io = serf_io.get(id(serf_module))
        held = [out for _, out, _ in serf_io.get(id(refs[0].parent), [])]
        if io and any(out is h for _, out, _ in io for h in held):
            passing.add(id(serf_module))
        if not io:
            sites[id(serf_module)] = "not run by the batches"
            continue
        producers, consumers, gates = [], [], []
        for x, out, at in io:
            producers += [m for m, t in made[:at] if t is x and _has_affine_weight(m)]
            found = [m for m, t, _ in taken if t is out and _linear(m)]
            consumers += found
            if not found:
                gates += _gate_factors(out, at, made, taken)
        producers, consumers, gates = _unique(producers), _unique(consumers), _unique(gates)
        if len(producers) != 1:
            sites[id(serf_module)] = "no single layer produces its input"
        elif not consumers and len(gates) != 1:
            sites[id(serf_module)] = "no layer to take its output scale"
        else:
            sites[id(serf_module)] = [(producers[0], "b", True),
                                      *[(c, "a", False) for c in consumers],
                                      *[(g, "a", True) for g in gates]]  # fmt: skip
    return sites, passing


def _gate_factors(out: Tensor, at: int, made: list, taken: list) -> list[nn.Module]:
    """In a gated MLP, ``down(act(gate(x)) * up(x))``: the module (``up``) whose output
    times ``out`` is what the next Linear takes in; scaling its weight and bias scales the
    product. Found by value, since the product is no module's output; only modules run
    near the activation (``at``: its place in the call order) are looked at."""
    products = [t for m, t, when in taken
                if when > at and _linear(m) and t.shape == out.shape][:1]  # fmt: skip
    if not products:
        return []
    found = []
    for module, other in made[max(0, at - _NEAR) : at + _NEAR]:
        if other is out or other.shape != out.shape or not _has_affine_weight(module):
            continue
        if torch.allclose(products[0], out * other, rtol=1e-5, atol=1e-6):
            found.append(module)
    return found


def _linear(module: nn.Module) -> bool:
    """Linear in its input (a consumer whose weight can take a scale): a Linear, a
    convolution, transformers' Conv1D (GPT-2's Linear with the weight transposed)."""
    return isinstance(module, _LINEAR_IN_INPUT) or (
        type(module).__name__ == "Conv1D" and _has_affine_weight(module)
    )


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    return list({id(m): m for m in modules}.values())


def _fold_checked(model: nn.Module, plans: list, call: tuple, tolerance: float) -> None:
    """Fold every plan's scales, and keep each fold only where the model then computes what
    it computes unfolded with ``a * Serf(b * x)`` in the Serf's place. All at once first; if
    that disagrees, one by one."""
    if not plans:
        return
    if _try_folds(model, plans, call, tolerance):
        return
    for plan in plans:
        _try_folds(model, [plan], call, tolerance)


def _try_folds(model: nn.Module, plans: list, call: tuple, tolerance: float) -> bool:
    from .distill import outputs

    with _scaled_serfs([(fit, serf_module) for fit, serf_module, _ in plans]):
        reference = outputs(model(*call[0], **call[1]))
    saved = {}
    for fit, _, site in plans:
        for module, which, with_bias in site:
            scale = fit.b if which == "b" else fit.a
            for pname, param in module.named_parameters(recurse=False):
                if pname == "weight" or with_bias:
                    saved.setdefault(id(param), (param, param.detach().clone()))
                    _scale(param, scale, _axis(module, pname, which == "b" or with_bias))
    folded = outputs(model(*call[0], **call[1]))
    same = all(_close(folded[k], reference[k], tolerance) for k in reference)
    for fit, _, _ in plans:
        fit.folded = same
        fit.reason = "" if same else "the folded model does not compute the fitted one"
    if not same:
        for param, value in saved.values():
            param.copy_(value)
    return same


def _axis(module: nn.Module, pname: str, output_side: bool) -> int:
    """The axis of ``module``'s parameter ``pname`` along which the activation's channels
    run: its output channels for the producer and a gate's factor, its input channels for a
    consumer (a Linear's weight is [out, in], transformers' Conv1D's [in, out])."""
    if pname == "bias" or module.weight.dim() == 1:
        return 0
    conv1d = type(module).__name__ == "Conv1D"
    return int(output_side == conv1d)


def _scale(param: Tensor, scale: Tensor, axis: int) -> None:
    """``param`` times ``scale`` in place, along ``axis`` when ``scale`` has one entry per
    channel. A parameter sharded by FSDP (a DTensor, rows split over the ranks) is scaled
    shard by shard with the slice of ``scale`` its rows are."""
    if scale.dim() == 0:
        param.mul_(float(scale))
        return
    local, start = param, 0
    if hasattr(param, "to_local"):
        local = param.to_local()
        for mesh_dim, placement in enumerate(param.placements):
            if placement.is_shard() and placement.dim == axis:
                size = param.device_mesh.size(mesh_dim)
                chunk = -(-param.shape[axis] // size)
                start = param.device_mesh.get_local_rank(mesh_dim) * chunk
    shape = [1] * local.dim()
    shape[axis] = local.shape[axis]
    piece = scale[start : start + local.shape[axis]]
    local.mul_(piece.to(device=local.device, dtype=local.dtype).view(shape))


def _close(found: Tensor, expected: Tensor, tolerance: float) -> bool:
    """Within ``tolerance`` of the output's own scale."""
    scale = float(expected.detach().float().abs().max()) or 1.0
    return float((found.float() - expected.float()).abs().max()) <= tolerance * scale


@contextmanager
def _scaled_serfs(pairs: list[tuple[Fit, Serf]]):
    """Each Serf computing ``a * Serf(b * x)`` for as long as the block runs (hooks)."""
    handles = []
    for fit, module in pairs:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, b=fit.b: (args[0] * b.to(args[0]), *args[1:])))  # fmt: skip
        handles.append(module.register_forward_hook(lambda m, args, out, a=fit.a: out * a.to(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def summary(fits: list[Fit]) -> str:
    """One line for the run's log: how many Serfs were fitted and folded, and the error to
    the original activations before and after (means over the folded ones)."""
    folded = [f for f in fits if f.folded]
    if not folded:
        reasons = sorted({f.reason for f in fits if f.reason})
        return f"no Serf fitted ({'; '.join(reasons) or 'none converted'})"
    before = sum(f.error_plain for f in folded) / len(folded)
    after = sum(f.error for f in folded) / len(folded)
    low, high = min(float(f.b.min()) for f in folded), max(float(f.b.max()) for f in folded)
    per_channel = sum(f.b.dim() > 0 for f in folded)
    left = len(fits) - len(folded)
    return (
        f"fitted {len(folded)} Serf{'s' if len(folded) > 1 else ''} to the activations they "
        f"replace as a * Serf(b * x) ({per_channel} per channel), folded into the neighbouring "
        f"layers (b {low:.2f} to {high:.2f}): error to the original activation {before:.1%} -> "
        f"{after:.2%} of its variance" + (f"; {left} left as they are" if left else "")
    )
