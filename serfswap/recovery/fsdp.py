"""Recovery of models that do not fit one device: FSDP2 (``fully_shard``) under ``torchrun``.

Under DistributedDataParallel every rank holds the whole student (fp32 weights, gradients and
two AdamW moments: 16 bytes a parameter) and the whole teacher. With ``fsdp=True`` each rank
holds a 1/N shard of each: the student is sharded per block (the repeated layers of a
transformer, the stages of a timm model), the root last, so that one block at a time is
gathered for its forward and backward; the teacher is sharded the same way for its forward only
(it has no gradients and no optimizer state). The optimizer then sees the shards (DTensors), so
its moments are sharded too. Gradients are averaged over ranks by the reduce-scatter, as DDP's
all-reduce does: N ranks follow the single-process run of the same global batch.

``fully_shard`` works in place: after the run the student's (and the teacher's) parameters are
shards, on the process group, which :func:`serfswap.recover` then leaves open even when it
started it. :func:`save_consolidated` writes them as the one consolidated file ``serfswap
export`` reads, gathering one tensor at a time into rank 0's file (never the whole model in one
process); then the caller destroys the group (``torch.distributed.destroy_process_group``).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io.safetensors_writer import file_order
from ..options import RecoveryOptions
from . import distributed
from . import state as trainstate


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, outermost first: the children of every ``ModuleList`` or
    ``Sequential`` of two or more modules of one class (a transformer's layers, timm's stages
    and blocks), not looking inside one found. Each is one unit of sharding."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        children = list(module.children())
        if (isinstance(module, nn.ModuleList | nn.Sequential) and len(children) >= 2
                and len({type(c) for c in children}) == 1
                and any(True for _ in children[0].parameters())):  # fmt: skip
            found.extend(children)
            return
        for child in children:
            visit(child)

    visit(model)
    return found


def shard(
    model: nn.Module,
    world: distributed.World,
    device: torch.device,
    *,
    bf16: bool = False,
    checkpointing: bool = False,
    forward_only: bool = False,
) -> None:
    """Shard ``model`` in place over the ranks of ``world``: each block, then the root.

    ``bf16``: gather the parameters in bfloat16 for the forward and backward, with the
    gradients reduced and the shards (the optimizer's weights) kept in float32
    (``MixedPrecisionPolicy``). ``checkpointing``: recompute each block's activations in the
    backward instead of keeping them (activation checkpointing, per block). ``forward_only``
    (the teacher): the root resharded after each forward too; FSDP2 keeps a root gathered
    after the forward for the backward that follows, which a teacher never runs, so its
    embeddings and head would stay whole on every rank for the run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = policy
    for block in blocks(model):
        if checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if forward_only else {}))


def shard_run(student: nn.Module, teacher: nn.Module, world: distributed.World,
              device: torch.device, opts: RecoveryOptions) -> bool:  # fmt: skip
    """Shard the student and the teacher when ``opts.fsdp`` asks for it and there are ranks
    to shard over (one process runs unsharded); whether they were. A teacher kept in
    bfloat16 (``opts.teacher_dtype``, see :func:`teacher_precision`) stays whole."""
    if not (opts.fsdp and world.size > 1):
        return False
    shard(student, world, device, bf16=opts.fsdp_bf16,
          checkpointing=opts.activation_checkpointing)  # fmt: skip
    if opts.teacher_dtype is None:
        shard(teacher, world, device, bf16=opts.fsdp_bf16, forward_only=True)
    return True


@contextlib.contextmanager
def teacher_precision(teacher: nn.Module, opts: RecoveryOptions) -> Iterator[None]:
    """With ``opts.teacher_dtype="bf16"``: the teacher cast to bfloat16 in place (weights and
    buffers; it stays so, as sharding leaves it sharded), and for the run, its floating-point
    inputs cast to bfloat16 and its floating-point outputs to float32, so that the losses and
    the evaluations compare float32 with float32. Half the teacher's memory, kept whole on each
    rank: its forward needs no gathers (see docs/scaling.md for when that pays)."""
    if opts.teacher_dtype is None:
        yield
        return
    teacher.to(torch.bfloat16)

    def inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _floats_to(args, torch.bfloat16), _floats_to(kwargs, torch.bfloat16)

    def outputs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _floats_to(output, torch.float32)

    hooks = [teacher.register_forward_pre_hook(inputs, with_kwargs=True),
             teacher.register_forward_hook(outputs, with_kwargs=True)]  # fmt: skip
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _floats_to(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with its floating-point tensors (in tuples, lists and dicts) cast to ``dtype``:
    a plain dict or sequence anew (the caller's batch is not touched), another mapping (a
    transformers ``ModelOutput``, the teacher's own output) in place, keeping its class."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if type(obj) in (tuple, list):
        return type(obj)(_floats_to(v, dtype) for v in obj)
    if type(obj) is dict:
        return {k: _floats_to(v, dtype) for k, v in obj.items()}
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _floats_to(obj[key], dtype)
    return obj


def local_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes this rank holds of the trainable parameters, their gradients and the
    optimizer's state (the local shards under FSDP; everything under DDP or on one process)."""

    def size(t: Tensor | None) -> int:
        if t is None:
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    moments = sum(size(v) for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, Tensor) and v.dim() > 0)  # fmt: skip
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params),
            "optimizer": moments}  # fmt: skip


def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The model's whole state on rank 0 as CPU tensors (None on the other ranks), gathered one
    tensor at a time: no rank ever holds more than one whole parameter on its device, but rank
    0's CPU memory holds them all (:func:`save_consolidated` writes the file without). A tensor
    stored under several names (tied embeddings) is gathered once and shared, as in the model.
    Every rank must call it (the gathers are collective)."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, Tensor] = {}
    seen: dict[int, Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        key = id(value)
        if key not in seen:
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            # The other ranks drop theirs at once: they keep a reference to the shard.
            seen[key] = full.detach().to("cpu", copy=True) if main else value
        out[name] = seen[key]
    return out if main else None


def save_consolidated(
    model: nn.Module,
    path: str | Path,
    *,
    arch: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> bool:
    """Write the (sharded) ``model`` as one serfswap checkpoint, the file ``save_checkpoint``
    writes for the same weights, byte for byte, without ever holding the whole model in one
    process: the header is written from the shards' global dtypes and shapes, then each tensor
    is gathered (every rank takes part), written by rank 0 and dropped. Whether this process
    wrote the file (rank 0, or a process without a group). Every rank must call it.

    A tensor of several names (tied embeddings) is gathered and stored once. Should rank 0 fail
    to write, it still takes part in the remaining gathers (the others would wait for it
    forever), then raises; the staged file is removed, nothing is left half-written. All ranks
    return together, once rank 0 has renamed the file into place: a rank that left first could
    tear the group down under rank 0's last write."""
    import torch.distributed as dist

    from ..io import checkpoint

    main = not dist.is_initialized() or dist.get_rank() == 0
    names: dict[int, set[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, value in state.items():
        names.setdefault(id(value), set()).add(name)
    dropped = checkpoint.tied_names(list(names.values()))
    specs = {name: (v.dtype, tuple(v.shape)) for name, v in state.items() if name not in dropped}
    try:
        with contextlib.ExitStack() as stack:
            writer, error = None, None
            if main:
                try:
                    entries = checkpoint.checkpoint_metadata(model, arch, metadata)
                    writer = stack.enter_context(
                        checkpoint.checkpoint_writer(path, specs, entries, dropped))  # fmt: skip
                except Exception as exc:  # raised once the gathers are done
                    error = exc
            for name in file_order(specs):
                value = state[name]
                full = value.full_tensor() if hasattr(value, "full_tensor") else value
                if writer is not None and error is None:
                    try:
                        writer.write(name, full)
                    except Exception as exc:  # as above
                        error = exc
                del full
            if error is not None:
                raise error  # inside the writer: the staged file is removed
    finally:  # every rank returns once the file is in place (or rank 0 has failed)
        if dist.is_initialized():
            dist.barrier()
    return main


def save_shards(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: trainstate.RunState,
    keep: int,
    world: distributed.World,
) -> Path:
    """Write a checkpoint of a sharded run: every rank its shards of the weights and of the
    optimizer's state (``torch.distributed.checkpoint``, into ``shards/``), rank 0 the run's
    state (``state.pt``: step, history, schedule, every rank's RNG state, the data position),
    then rank 0 renames the folder into place as :mod:`state` does. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = folder / f".tmp-step-{state.step:08d}-sharded"  # one name that every rank knows
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier(world)
    weights, moments = get_state_dict(model, optimizer)
    with _one_process_quiet():
        dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=tmp / "shards")
    final = folder / f"step-{state.step:08d}"
    if world.main:
        final = trainstate.commit(tmp, folder, state, keep)
    distributed.barrier(world)
    return final


def check_whole_checkpoint(path: Path, sharded: bool) -> None:
    """Refuse to resume a sharded run from a checkpoint that holds the whole model (written by
    a run without ``fsdp``): its optimizer state is not in shards."""
    if sharded:
        raise CheckpointError(
            f"{path} was written by a run without fsdp: resume it without fsdp (--fsdp), or "
            "on one process"
        )


def load_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and the optimizer's state of the sharded checkpoint ``path`` into
    ``model`` and ``optimizer``, sharded or not, at any number of ranks (the checkpoint's
    shards are re-cut to the model's own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # (get_state_dict creates AdamW's state with a step at learning rate 0 when it has none
    # yet, so that the checkpoint's has somewhere to load into.)
    weights, moments = get_state_dict(model, optimizer)
    loaded = {"model": weights, "optimizer": moments}
    try:
        with _one_process_quiet():
            dcp.load(loaded, checkpoint_id=path / "shards")
    except Exception as exc:  # a damaged checkpoint, or another model's
        raise CheckpointError(f"{path}: the shards do not fit this model ({exc})") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optimizer"])  # fmt: skip


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group (an FSDP run on one process, which writes and reads the same
    sharded checkpoints as any other), torch.distributed.checkpoint warns that it assumes one
    process: it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield
