"""``serfswap recover MODEL --data D --steps N -o OUT``: convert, then distil from the original;
its options are :class:`~serfswap.options.RecoveryOptions`' fields, checked before anything
loads."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, SerfswapError
from ..options import RecoveryOptions
from ..recovery.stream import DEFAULT_HELD_OUT as STREAM_HELD_OUT
from .loading import (
    add_model_arguments,
    add_swap_arguments,
    beside,
    check_model_arguments,
    checkpoint_arch,
    hf_arch_dir,
    load,
    needs_module,
    output_path,
    swap_options,
)

if TYPE_CHECKING:
    import torch


def run(args: argparse.Namespace) -> int:
    """Recover MODEL as checked by :func:`check`, printing the steps on stdout."""
    # The library says what it is doing in the slow parts without a progress bar (BatchNorm
    # re-estimation, the "before" evaluation, skipping to where a run resumes): shown here as
    # plain lines, flushed at once, for this command only.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("serfswap")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _recover(args)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _recover(args: argparse.Namespace) -> int:
    # One command's script, step by step: load, read the data, convert, recover, write, clean
    # up; each step is a call or two, in the order the user sees them printed.
    from ..recovery.loop import recover
    from ..rewrite.convert import convert

    options: RecoveryOptions = args.options
    device = _device(args.device)
    if options.plot is not None:
        from ..recovery.log import require_matplotlib

        require_matplotlib()
    random_timm = args.model.startswith("timm:") and not Path(args.model).exists()
    if random_timm and args.weights is None:
        raise InvalidArgumentError(
            f"{args.model} has random weights here; pass --weights FILE (recovery distils from "
            "the original, which must be the trained model)",
            option="--weights",
        )
    print(f"loading {args.model}", flush=True)  # on stdout: recover tells its steps there
    loaded = load(args, quiet=True)
    teacher = _teacher(loaded)
    arch = checkpoint_arch(loaded)
    batches = _batches(args, teacher)
    print(f"data: {batches.description}")
    teacher = teacher.to(device).eval()
    student = convert(teacher, **swap_options(args))
    print(student.serfswap_report.summary())
    result = recover(student, teacher, batches.train, steps=args.steps,
                     eval_data=batches.held_out, options=options)  # fmt: skip
    print(result)
    if not _write(student, args.out, arch):
        return 0  # a rank of a sharded run other than 0, which writes OUT and tidies up
    print(f"wrote {args.out}")
    if result.checkpoint is not None:
        _checkpoints_done(checkpoint_dir(args, args.out), keep=args.keep_checkpoints)
    if options.plot is not None:
        print(f"wrote {options.plot}")
    return 0


def _write(student: Any, out: Path, arch: dict[str, Any] | None) -> bool:
    """Write OUT; False on the ranks of a sharded (``--fsdp``) run other than 0. A sharded
    student is gathered one tensor at a time (every rank takes part) into the one file rank 0
    writes as it goes; then the process group that recover() left open for it is closed."""
    import torch
    import torch.distributed as dist

    from ..io.checkpoint import save_checkpoint

    if not (dist.is_available() and dist.is_initialized()):
        save_checkpoint(student.to(torch.device("cpu")), out, arch=arch)
        return True
    from ..recovery.fsdp import save_consolidated

    try:
        return save_consolidated(student, out, arch=arch)
    finally:
        dist.destroy_process_group()


def _teacher(loaded: Any) -> Any:
    """MODEL as the teacher: a module that is not converted already."""
    from ..rewrite.convert import REPORT_ATTR

    needs_module(loaded, "recover")
    if getattr(loaded.model, REPORT_ATTR, None) is not None:
        raise InvalidArgumentError(
            f"{loaded.source} is already converted; recovery needs the original model as teacher",
            option="MODEL",
        )
    return loaded.model


def _batches(args: argparse.Namespace, teacher: Any) -> Any:
    """--data as training and held-out batches: images with the model's transforms, or text
    with its tokenizer: from a text file, or streamed from JSON lines, Parquet, Arrow, a
    datasets folder; packed into full rows for a causal LM (or with --pack), so that no step is
    spent on padding."""
    from ..recovery import data as recovery_data
    from ..recovery import stream
    from ..recovery.lm import is_causal_lm

    source = Path(args.data)
    pack = args.pack or is_causal_lm(teacher)
    if stream.is_stream(source):
        return stream.texts(source, _tokenizer_dir(args), args.batch_size, args.held_out,
                            args.max_length, text_field=args.text_field, pack=pack,
                            trust_remote_code=args.trust_remote_code)  # fmt: skip
    if source.is_dir():
        return recovery_data.images(source, teacher, args.batch_size, args.held_out, args.seed)
    return recovery_data.texts(source, _tokenizer_dir(args), args.batch_size, args.held_out,
                               args.seed, args.max_length, pack=pack,
                               trust_remote_code=args.trust_remote_code)  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """recover's arguments, OUT, --data, the side outputs and the run in the checkpoint folder,
    before torch is imported: a slip is refused at once, not after the model has loaded. The
    numbers come first, so that a bad --lr is the error even when MODEL is wrong too. Leaves
    OUT in ``args.out`` and the run's :class:`RecoveryOptions` in ``args.options``."""
    _check_recover_numbers(args)
    check_model_arguments(args)
    out = output_path(args, args.data, args.tokenizer)
    _check_data(args.data, args.text_field, pack=args.pack)
    checkpoints = checkpoint_dir(args, out)
    _check_unfinished(checkpoints, resume=args.resume)
    if args.plot == "":
        args.plot = str(beside(out, ".curves.png", "--plot PNG"))
    _check_side_outputs(args, out, checkpoints)
    args.out = out
    args.options = _options(args, checkpoints)


def _options(args: argparse.Namespace, checkpoints: Path) -> RecoveryOptions:
    """The run's RecoveryOptions from the generated options; evaluations and checkpoints every
    tenth of the run unless said (RecoveryOptions.every)."""
    given = {f.name: getattr(args, f.name) for f in fields(RecoveryOptions) if f.metadata}
    for name in ("eval_every", "checkpoint_every"):
        if given[name] is None:
            given[name] = RecoveryOptions.every(args.steps)
    given["checkpoint_dir"] = checkpoints
    return RecoveryOptions(**given)


def add_recovery_options(parser: argparse.ArgumentParser) -> None:
    """``--name`` for each RecoveryOptions field that has CLI metadata: its help, default,
    type (a bool is a flag) and argparse's extras from the field."""
    kinds = {"float": float, "int": int}
    for f in fields(RecoveryOptions):
        if not f.metadata:
            continue
        extra = dict(f.metadata["argparse"])
        if f.type == "bool":
            extra.setdefault("action", "store_true")
        else:
            extra.setdefault("default", f.default)
            if f.type in kinds:
                extra.setdefault("type", kinds[str(f.type)])
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **extra)


def checkpoint_dir(args: argparse.Namespace, out: Path) -> Path:
    """--checkpoint-dir, or OUT.checkpoints beside OUT."""
    return Path(args.checkpoint_dir or beside(out, ".checkpoints", "--checkpoint-dir"))


def _check_data(spec: str, text_field: str = "text", *, pack: bool = False) -> Path:
    """--data: an image folder, a text file, or text to stream (JSON lines, Parquet, Arrow, a
    datasets folder, a folder of those; all but JSON lines need pyarrow, checked here); a single
    image is none (it would be read as text), and is refused saying what --data takes."""
    from ..io.paths import check_input_path, is_image
    from ..recovery import stream

    source = check_input_path(spec)
    if not text_field:
        raise InvalidArgumentError("--text-field is empty", option="--text-field")
    if stream.is_stream(source) and stream.needs_pyarrow(source):
        stream.require_pyarrow(source)
    if pack and source.is_dir() and not stream.is_stream(source):
        raise InvalidArgumentError("--pack packs text; --data is an image folder", option="--pack")
    if source.is_file() and is_image(source):
        raise InvalidArgumentError(
            f"--data {spec} is an image file; --data takes a folder of images (class "
            "subfolders or flat; a share is held out, so at least 2) or a text file with one "
            "example per line",
            option="--data",
        )
    return source


def _check_unfinished(folder: Path, *, resume: bool) -> None:
    """Refuse to start over where a killed run waits to be resumed. Only a folder that holds
    checkpoints costs the torch import (to read where its run stood)."""
    if resume or not folder.is_dir() or not any(folder.iterdir()):
        return
    from ..recovery import state as trainstate

    found = trainstate.checkpoints(folder)
    if found:
        step, steps = trainstate.progress(found[-1][1])
        if step < steps:
            raise InvalidArgumentError(
                f"{folder} holds an unfinished recovery run (step {step} of {steps}): pass "
                "--resume to continue it, or --checkpoint-dir elsewhere to start another",
                option="--resume",
            )


def _check_side_outputs(args: argparse.Namespace, out: Path, checkpoints: Path) -> None:
    """--log, --plot and the checkpoint folder, checked as OUT is, before anything is loaded:
    none is an input, a link to one or a file of an input folder, and no two are one file."""
    from ..io.paths import check_distinct_outputs, check_output_dir, check_output_path

    inputs = [args.model, args.weights, hf_arch_dir(args), args.data, args.tokenizer]
    for side in (args.log, args.plot):
        if side is not None:
            check_output_path(side, inputs)
    check_output_dir(checkpoints, inputs)
    check_distinct_outputs([out, args.log, args.plot, checkpoints])


def _check_recover_numbers(args: argparse.Namespace) -> None:
    """The numeric options' ranges, before anything is loaded."""
    if args.steps < 1:
        raise InvalidArgumentError(f"--steps {args.steps}: give at least 1 step", option="--steps")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise InvalidArgumentError(
            f"--lr {args.lr}: give a positive learning rate, e.g. 1e-4", option="--lr"
        )
    if args.max_length < 1 or (args.checkpoint_every or 0) < 0:
        raise InvalidArgumentError(
            "--max-length must be >= 1 and --checkpoint-every >= 0", option="--max-length"
        )
    held = args.held_out
    if args.batch_size < 1 or not (0 < held < 1 or (held >= 1 and float(held).is_integer())):
        raise InvalidArgumentError(
            "--batch-size must be >= 1 and --held-out a share between 0 and 1 or a count of "
            "examples from 1 up",
            option="--batch-size",
        )
    if args.keep < 1 or min(args.bn_batches, args.fit_batches) < 0 or (args.eval_every or 0) < 0:
        raise InvalidArgumentError(
            "--keep must be >= 1, --fit-batches, --bn-batches and --eval-every >= 0",
            option="--keep",
        )
    if not (0 <= args.warmup <= 1 and 0 <= args.blend <= 1):
        raise InvalidArgumentError(
            "--warmup and --blend are fractions of the steps, 0 to 1", option="--warmup"
        )


def _checkpoints_done(checkpoints: Path, *, keep: bool) -> None:
    """Remove the run's checkpoints (called only once OUT is written: until then they are the
    run's only result), or say how the kept ones extend the run."""
    from ..recovery import state as trainstate

    if not keep:
        removed = trainstate.remove_run(checkpoints)
        print(f"removed the run's {removed} checkpoint(s) from {checkpoints}/ (--keep-checkpoints "
              "keeps them, to extend the run later with --resume and more --steps)")  # fmt: skip
    else:
        print(f"kept the checkpoints in {checkpoints}/: --resume with more --steps extends "
              "this run")  # fmt: skip


def _device(name: str) -> torch.device:
    """--device as a torch.device; "auto" is CUDA when torch sees it (under torchrun, the GPU
    of the process's LOCAL_RANK)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"--device {name}: torch sees no CUDA device here", option="--device"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgumentError(
            f"--device {name}: not a device (cpu, cuda:N)", option="--device"
        ) from None
    # Under torchrun each process of a machine takes its own GPU, the one of its LOCAL_RANK.
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _tokenizer_dir(args: argparse.Namespace) -> Path:
    """Where the text's tokenizer is: --tokenizer, else the model's own directory."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if Path(args.model).is_dir():
        return Path(args.model)
    if args.arch and args.arch.startswith("hf:"):
        return Path(args.arch[3:])
    raise InvalidArgumentError(
        "a text file needs the model's tokenizer: give a HuggingFace model directory as MODEL, "
        "--arch hf:DIR, or --tokenizer DIR",
        option="--tokenizer",
    )


def resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted recover leaves to continue from: its newest checkpoint and the flag
    that continues it (the same command with --resume), or that none was written yet."""
    if args.command != "recover" or "serfswap.recovery.state" not in sys.modules:
        return ""  # interrupted before training could write any checkpoint
    from ..recovery import state as trainstate

    try:
        folder = checkpoint_dir(args, Path(args.output))
        found = trainstate.checkpoints(folder)
    except (SerfswapError, OSError):
        return ""
    if not found:
        return "; no checkpoint was written yet (--checkpoint-every sets how often)"
    return (
        f"; the newest checkpoint is {found[-1][1]} (step {found[-1][0]}): run the same command "
        "with --resume to continue from it"
    )


def add_command(commands: Any) -> None:
    """The `recover` command's arguments: its own (the data, the run's length, where it goes)
    and, generated, the RecoveryOptions fields it offers."""
    parser = commands.add_parser(
        "recover",
        help="convert, then fine-tune with the original as teacher; write a checkpoint",
        description="Convert MODEL to Serf and recover its quality by distillation from the "
        "unconverted MODEL, on an image folder (timm models; the model's own transforms), a "
        "text file with one example per line, or text streamed from JSON lines, Parquet, Arrow "
        "files or a datasets folder (HuggingFace models; the model's tokenizer). "
        "A share of the data is held out for the before/after figures. Checkpoints are written "
        "as the run goes: --resume continues a killed run to exactly the weights it would have "
        "had, or extends a finished one (kept with --keep-checkpoints) to more --steps; they "
        "are removed once OUT is written. Rerunning a finished command starts it over. OUT is "
        "a serfswap checkpoint that `serfswap export` reads.",
    )
    add_model_arguments(parser)
    add_swap_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="an image folder, a text file (one example a line), or text to "
                        "stream: .jsonl, .parquet, .arrow, a datasets folder, a folder of "
                        "those")  # fmt: skip
    parser.add_argument("--steps", type=int, required=True,
                        help="optimiser steps in all; with --resume, more than a finished run's "
                        "extends it")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="the checkpoint to write")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per step (default: %(default)s)"
    )
    parser.add_argument(
        "--held-out", type=float, default=0.1,
        help="share held out, or from 1 up a count of examples; a streamed file holds out its "
        f"first N examples (a share: {STREAM_HELD_OUT}) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--text-field", default="text",
                        help="the field (JSON lines) or column (Parquet, Arrow, datasets) that "
                        "holds the text (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pack", action="store_true",
                        help="text in rows of exactly --max-length tokens, the examples "
                        "end to end, EOS after each (no padding; on for causal LMs)")  # fmt: skip
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per text example (default: %(default)s)"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL's directory)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    add_recovery_options(parser)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep them once OUT is written (to extend the run later)")  # fmt: skip
    parser.set_defaults(func=run, check=check)
