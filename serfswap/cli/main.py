"""The ``serfswap`` command: a thin shell over the Python API.

One plain function per command. Heavy imports (onnx, onnxruntime, timm, transformers) happen
inside the commands, so ``serfswap --help`` is instant. User errors (:class:`SerfswapError`)
print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import InvalidArgumentError, SerfswapError
from ..onnx_ops.decompositions import DECOMPOSITIONS
from ..onnx_ops.decompositions import DEFAULT as DEFAULT_DECOMPOSITION
from ..options import (
    AUTOCAST_CHOICES,
    DEFAULT_DTYPE,
    DEFAULT_OPSET,
    DTYPE_NAMES,
    EXPORTERS,
    SEQ2SEQ_TASKS,
    TASKS,
    TOLERANCE,
    TRAIN_CHOICES,
    RecoveryOptions,
    check_opset,
)
from .generate import add_generate_command

# The library's defaults are the command's: one place for each (plain values, importable
# without torch: parsing and checking the arguments imports nothing heavy).
DEFAULTS = RecoveryOptions()

if TYPE_CHECKING:
    import torch

    from ..io.load import Loaded

_PACKAGES = (
    "torch",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "timm",
    "transformers",
    "safetensors",
)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """What a bug report needs: versions, and which accelerators torch and onnxruntime see."""
    import torch

    info: dict[str, object] = {
        "serfswap": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    info.update({name: _installed_version(name) for name in _PACKAGES})
    info["torch_cuda_build"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError as exc:  # a broken install is exactly what this command reports
        providers = [f"unavailable: {exc}"]
    info["onnxruntime_providers"] = providers
    info["onnxruntime_cuda_provider"] = "CUDAExecutionProvider" in providers
    info["torch_threads"] = torch.get_num_threads()
    return info


def cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:<{width}}  {'not installed' if value is None else value}")
    return 0


def _add_env(commands: Any) -> None:
    """The `env` command's arguments."""
    parser = commands.add_parser("env", help="print versions and accelerators, for bug reports")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=cmd_env)


def _load(args: argparse.Namespace, *, quiet: bool = False) -> Loaded:
    from ..io.load import load_model

    if not quiet:
        progress(args, f"loading {args.model} ...")
    loaded = load_model(
        args.model,
        arch=args.arch,
        weights=args.weights,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
        timm_kwargs=_timm_kwargs(args),
    )
    for note in loaded.notes:
        print(f"serfswap {args.command}: note: {note}", file=sys.stderr)
    return loaded


def progress(args: argparse.Namespace, message: str) -> None:
    """One line on stderr saying what a slow step is doing (loading, exporting), when stderr is
    a terminal: seconds to minutes of silence look like a hang; a log or a pipe keeps only the
    command's result and its errors."""
    if sys.stderr.isatty():
        print(f"serfswap {args.command}: {message}", file=sys.stderr, flush=True)


def _check_nothing(args: argparse.Namespace) -> None:
    """The commands whose arguments need no check before they run."""


def _check_model_arguments(args: argparse.Namespace) -> None:
    """MODEL, --weights and the timm keywords, checked without loading anything: an ONNX file
    where a PyTorch model is read, a folder given as --weights, --model-kwargs that is not
    JSON are refused before torch is imported."""
    from ..io.paths import check_weights_path, is_onnx, onnx_given

    if is_onnx(Path(args.model)):
        raise InvalidArgumentError(onnx_given(args.model))
    if args.weights is not None:
        check_weights_path(args.weights)
    _timm_kwargs(args)


def _check_convert(args: argparse.Namespace) -> None:
    """convert's arguments and OUT (a checkpoint file, or a HuggingFace folder), before
    anything is loaded."""
    from ..io.paths import check_input_path, check_output_folder, wants_folder

    _check_model_arguments(args)
    if not wants_folder(args.output):
        if args.files_from is not None:
            raise InvalidArgumentError("--files-from goes with -o DIR/ (a HuggingFace folder)")
        _output(args)
        return
    if args.model.startswith("timm:") and not Path(args.model).exists():
        raise InvalidArgumentError(
            f"a HuggingFace folder needs a transformers model, not {args.model}; write a "
            "serfswap checkpoint (-o FILE.safetensors) instead"
        )
    check_output_folder(args.output, [args.model, args.weights, args.files_from])
    if args.files_from is not None and not check_input_path(args.files_from).is_dir():
        raise InvalidArgumentError(f"--files-from {args.files_from}: not a folder")


def _timm_kwargs(args: argparse.Namespace) -> dict[str, object] | None:
    """--model-kwargs (a JSON object) and --num-classes, for timm.create_model."""
    kwargs: dict[str, object] = {}
    if args.model_kwargs is not None:
        try:
            parsed = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--model-kwargs is not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise InvalidArgumentError(
                "--model-kwargs takes a JSON object, e.g. '{\"in_chans\": 1}'"
            )
        kwargs.update(parsed)
    if args.num_classes is not None:
        if args.num_classes < 0:
            raise InvalidArgumentError("--num-classes must be >= 0 (0: no classifier)")
        kwargs["num_classes"] = args.num_classes
    return kwargs or None


def _output(args: argparse.Namespace, *extra_inputs: str | None) -> Path:
    """OUT, checked before anything is loaded: writable, and none of the command's inputs."""
    from ..io.paths import check_output_path

    arch_dir = args.arch[3:] if args.arch and args.arch.startswith("hf:") else None
    return check_output_path(args.output, [args.model, args.weights, arch_dir, *extra_inputs])


def _swap_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "include": args.include,
        "exclude": args.exclude,
        "activations": args.activations,
        "audit": False if args.no_audit else None,
    }


def _needs_module(loaded: Loaded, command: str) -> None:
    import torch

    if isinstance(loaded.model, torch.export.ExportedProgram):
        raise InvalidArgumentError(
            f"{command} needs a module, and {loaded.source} is a torch.export program; "
            "convert the module before torch.export, then `serfswap export` the program"
        )


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..rewrite.convert import plan

    loaded = _load(args)
    _needs_module(loaded, "inspect")
    # The plan shows even when nothing would be converted (convert refuses that): its notes
    # say why, in the command line's words.
    print(cli_words(str(plan(loaded.model, **_swap_options(args)))))
    return 0


def _add_inspect(commands: Any) -> None:
    """The `inspect` command's arguments."""
    parser = commands.add_parser(
        "inspect",
        help="the plan: which activations, where, how many, what would be left",
        description="Print what `serfswap convert` would change, changing nothing.",
    )
    _add_model_arguments(parser)
    _add_swap_arguments(parser)
    parser.set_defaults(func=cmd_inspect, check=_check_model_arguments)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..io.load import save_checkpoint
    from ..io.paths import wants_folder
    from ..rewrite.convert import convert

    if wants_folder(args.output):
        return _convert_to_folder(args)
    out = _output(args)
    loaded = _load(args)
    _needs_module(loaded, "convert")
    arch = _checkpoint_arch(loaded)
    converted = convert(loaded.model, inplace=True, strict=args.strict, **_swap_options(args))
    save_checkpoint(converted, out, arch=arch)
    print(converted.serfswap_report)
    print(f"wrote {out}; load it with serfswap.io.load_model({str(out)!r}) or `serfswap export`")
    return 0


def _convert_to_folder(args: argparse.Namespace) -> int:
    """convert -o DIR/: MODEL (a HuggingFace folder, or a serfswap checkpoint of a transformers
    model, e.g. what recover wrote) converted and written with save_pretrained, the original
    folder's tokenizer and sentence-transformers files copied beside it: the way back from the
    command line to transformers and sentence-transformers."""
    from ..io.load import save_hf_folder
    from ..rewrite.convert import convert

    files_from = args.files_from
    if files_from is None and Path(args.model).is_dir():
        files_from = args.model
    loaded = _load(args)
    _needs_module(loaded, "convert")
    converted = convert(loaded.model, inplace=True, strict=args.strict, **_swap_options(args))
    copied = save_hf_folder(converted, args.output, files_from=files_from)
    folder = args.output.rstrip("/" + os.sep)
    print(converted.serfswap_report)
    print(f"wrote {folder}/ (save_pretrained" + (f"; copied from {files_from}: "
          + ", ".join(copied) if copied else "") + "); load it with transformers or "
          "sentence-transformers after `import serfswap`")  # fmt: skip
    if files_from is None:
        print("  hint: --files-from ORIGINAL_DIR copies the tokenizer (and sentence-transformers "
              "files) of the folder the model came from")  # fmt: skip
    return 0


def _checkpoint_arch(loaded: Loaded) -> dict[str, Any]:
    """How the output checkpoint describes MODEL's architecture, without pickled code."""
    from ..io.load import describe

    arch = loaded.arch or describe(loaded.model)
    if arch is None:
        raise InvalidArgumentError(
            f"cannot describe the architecture of {loaded.source} ({type(loaded.model).__name__}) "
            "for a checkpoint without pickled code (timm and transformers models only)"
        )
    return arch


def _add_convert(commands: Any) -> None:
    """The `convert` command's arguments."""
    parser = commands.add_parser(
        "convert",
        help="convert a model and write a serfswap checkpoint",
        description="Convert MODEL's activations to Serf and write a checkpoint (.safetensors: "
        "weights plus a description of the architecture and the swap; no pickled code).",
    )
    _add_model_arguments(parser)
    _add_swap_arguments(parser)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail (writing nothing) when the audit sees activations that were to be converted "
        "still run, or cannot run",
    )
    parser.add_argument("-o", "--output", required=True,
                        help="the checkpoint to write (FILE.safetensors), or DIR/ for a "
                        "HuggingFace folder (save_pretrained; transformers models)")  # fmt: skip
    parser.add_argument("--files-from", metavar="DIR",
                        help="with -o DIR/: copy the tokenizer and sentence-transformers files "
                        "of this folder (default: MODEL's, when it is a folder)")  # fmt: skip
    parser.set_defaults(func=cmd_convert, check=_check_convert)


def cmd_recover(args: argparse.Namespace) -> int:
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
    # One command's script, step by step: check, load, read the data, convert, recover, write,
    # clean up; each step is a call or two, in the order the user sees them printed.
    import torch

    from ..io.load import save_checkpoint
    from ..recovery import data as recovery_data
    from ..recovery.loop import recover
    from ..rewrite.convert import REPORT_ATTR, convert

    out = _output(args, args.data, args.tokenizer)
    source = Path(args.data)
    checkpoints = _checkpoint_dir(args, out)
    device = _device(args.device)
    if args.plot == "":
        args.plot = str(_beside(out, ".curves.png", "--plot PNG"))
    _check_side_outputs(args, out, checkpoints)
    if args.plot is not None:
        from ..recovery.log import require_matplotlib

        require_matplotlib()
    random_timm = args.model.startswith("timm:") and not Path(args.model).exists()
    if random_timm and args.weights is None:
        raise InvalidArgumentError(
            f"{args.model} has random weights here; pass --weights FILE (recovery distils from "
            "the original, which must be the trained model)"
        )
    print(f"loading {args.model}", flush=True)  # on stdout: recover tells its steps there
    loaded = _load(args, quiet=True)
    _needs_module(loaded, "recover")
    teacher = loaded.model
    if getattr(teacher, REPORT_ATTR, None) is not None:
        raise InvalidArgumentError(
            f"{loaded.source} is already converted; recovery needs the original model as teacher"
        )
    arch = _checkpoint_arch(loaded)
    if source.is_dir():
        batches = recovery_data.images(source, teacher, args.batch_size, args.held_out, args.seed)
    else:
        tokenizer = _tokenizer_dir(args)
        batches = recovery_data.texts(source, tokenizer, args.batch_size, args.held_out,
                                      args.seed, args.max_length,
                                      trust_remote_code=args.trust_remote_code)  # fmt: skip
    print(f"data: {batches.description}")
    teacher = teacher.to(device).eval()
    student = convert(teacher, **_swap_options(args))
    print(student.serfswap_report.summary())
    every = args.checkpoint_every if args.checkpoint_every is not None else max(1, args.steps // 10)
    evals = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)
    result = recover(
        student, teacher, batches.train, steps=args.steps, eval_data=batches.held_out,
        lr=args.lr, seed=args.seed, checkpoint_dir=checkpoints, checkpoint_every=every,
        keep=args.keep, resume=args.resume, eval_every=evals, log=args.log, plot=args.plot,
        train=args.train, autocast=args.autocast, bn_batches=args.bn_batches,
        warmup=args.warmup, blend=args.blend,
    )  # fmt: skip
    print(result)
    save_checkpoint(student.to(torch.device("cpu")), out, arch=arch)
    print(f"wrote {out}")
    if result.checkpoint is not None:
        _checkpoints_done(checkpoints, keep=args.keep_checkpoints)
    if args.plot is not None:
        print(f"wrote {args.plot}")
    return 0


def _check_recover(args: argparse.Namespace) -> None:
    """recover's arguments, OUT, --data and the run in the checkpoint folder, before torch is
    imported: a slip is refused at once, not after the model has loaded."""
    _check_recover_numbers(args)
    _check_model_arguments(args)
    out = _output(args, args.data, args.tokenizer)
    _check_data(args.data)
    _check_unfinished(_checkpoint_dir(args, out), resume=args.resume)


def _checkpoint_dir(args: argparse.Namespace, out: Path) -> Path:
    return Path(args.checkpoint_dir or _beside(out, ".checkpoints", "--checkpoint-dir"))


def _check_data(spec: str) -> Path:
    """--data: an image folder or a text file; a single image is neither (it would be read as
    text), and is refused saying what --data takes."""
    from ..io.paths import check_input_path, is_image

    source = check_input_path(spec)
    if source.is_file() and is_image(source):
        raise InvalidArgumentError(
            f"--data {spec} is an image file; --data takes a folder of images (class "
            "subfolders or flat; a share is held out, so at least 2) or a text file with one "
            "example per line"
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
                "--resume to continue it, or --checkpoint-dir elsewhere to start another"
            )


def _check_side_outputs(args: argparse.Namespace, out: Path, checkpoints: Path) -> None:
    """--log, --plot and the checkpoint folder, checked as OUT is, before anything is loaded:
    none is an input, a link to one or a file of an input folder, and no two are one file."""
    from ..io.paths import check_distinct_outputs, check_output_dir, check_output_path

    arch_dir = args.arch[3:] if args.arch and args.arch.startswith("hf:") else None
    inputs = [args.model, args.weights, arch_dir, args.data, args.tokenizer]
    for side in (args.log, args.plot):
        if side is not None:
            check_output_path(side, inputs)
    check_output_dir(checkpoints, inputs)
    check_distinct_outputs([out, args.log, args.plot, checkpoints])


def _check_recover_numbers(args: argparse.Namespace) -> None:
    """The numeric options' ranges, before anything is loaded."""
    if args.steps < 1:
        raise InvalidArgumentError(f"--steps {args.steps}: give at least 1 step")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InvalidArgumentError(f"--lr {args.lr}: give a positive learning rate, e.g. 1e-4")
    if args.max_length < 1 or (args.checkpoint_every or 0) < 0:
        raise InvalidArgumentError("--max-length must be >= 1 and --checkpoint-every >= 0")
    if args.batch_size < 1 or not 0 < args.held_out < 1:
        raise InvalidArgumentError("--batch-size must be >= 1 and --held-out between 0 and 1")
    if args.keep < 1 or args.bn_batches < 0 or (args.eval_every or 0) < 0:
        raise InvalidArgumentError("--keep must be >= 1, --bn-batches and --eval-every >= 0")
    if not (0 <= args.warmup <= 1 and 0 <= args.blend <= 1):
        raise InvalidArgumentError("--warmup and --blend are fractions of the steps, 0 to 1")


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


def _add_recover(commands: Any) -> None:
    """The `recover` command's arguments. Long because the command has many options, one
    declaration each; nothing to split but the list."""
    parser = commands.add_parser(
        "recover",
        help="convert, then fine-tune with the original as teacher; write a checkpoint",
        description="Convert MODEL to Serf and recover its quality by distillation from the "
        "unconverted MODEL, on an image folder (timm models; the model's own transforms) or a "
        "text file with one example per line (HuggingFace models; the model's tokenizer). "
        "A share of the data is held out for the before/after figures. Checkpoints are written "
        "as the run goes: --resume continues a killed run to exactly the weights it would have "
        "had, or extends a finished one (kept with --keep-checkpoints) to more --steps; they "
        "are removed once OUT is written. Rerunning a finished command starts it over. OUT is "
        "a serfswap checkpoint that `serfswap export` reads.",
    )
    _add_model_arguments(parser)
    _add_swap_arguments(parser)
    parser.add_argument("--data", required=True, help="an image folder or a text file")
    parser.add_argument("--steps", type=int, required=True,
                     help="optimiser steps in all; with --resume, more than a finished run's "
                     "extends it")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="the checkpoint to write")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per step (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr,
                     help="peak learning rate (AdamW; warmup, then cosine decay to 0; "
                     "default: %(default)s)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=DEFAULTS.warmup,
                     help="fraction of the steps of linear warmup "
                     "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--blend", type=float, default=DEFAULTS.blend,
                     help="fraction of the steps over which each Serf ramps from the original "
                     "activation (0: off; default: %(default)s)")  # fmt: skip
    parser.add_argument("--bn-batches", type=int, default=DEFAULTS.bn_batches,
                     help="batches to re-estimate BatchNorm statistics on first, for models "
                     "with BatchNorm (0: off; default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="default: %(default)s")
    parser.add_argument(
        "--held-out", type=float, default=0.1, help="share held out (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per text example (default: %(default)s)"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL's directory)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    parser.add_argument("--train", choices=TRAIN_CHOICES, default=DEFAULTS.train,
                     help="train all parameters, or only the converted modules'")  # fmt: skip
    parser.add_argument("--autocast", choices=[c for c in AUTOCAST_CHOICES if c],
                        help="bfloat16 autocast")  # fmt: skip
    parser.add_argument("--eval-every", type=int,
                     help="steps between held-out evaluations (default: steps / 10; 0: only "
                     "before and after)")  # fmt: skip
    parser.add_argument("--checkpoint-dir", help="default: OUT.checkpoints next to OUT")
    parser.add_argument("--checkpoint-every", type=int,
                     help="steps (default: steps / 10; 0: no checkpoints)")  # fmt: skip
    parser.add_argument(
        "--keep",
        type=int,
        default=DEFAULTS.keep,
        help="checkpoints kept while the run goes (default: %(default)s)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true",
                     help="keep them once OUT is written (to extend the run later)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                     help="continue from the last checkpoint (exactly), or extend a finished "
                     "run to more --steps")  # fmt: skip
    parser.add_argument("--log", help="a JSON-lines file, one line per step")
    parser.add_argument("--plot", nargs="?", const="", help="write the curves as a PNG "
                     "(default name: OUT.curves.png)")  # fmt: skip
    parser.set_defaults(func=cmd_recover, check=_check_recover)


def _beside(out: Path, suffix: str, option: str) -> Path:
    """A default name derived from OUT, refused up front when the folder cannot hold a name
    that long (OUT may legally be 255 bytes; OUT.checkpoints then is not)."""
    path = out.with_name(out.name + suffix)
    if len(os.fsencode(path.name)) > os.pathconf(out.parent, "PC_NAME_MAX"):
        raise InvalidArgumentError(
            f"the default {path.name[:20]}...{suffix} is too long a name here; pass {option}"
        )
    return path


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {name}: torch sees no CUDA device here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidArgumentError(f"--device {name}: not a device (cpu, cuda:N)") from None


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
        "--arch hf:DIR, or --tokenizer DIR"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import demo

    if args.steps < 1 or args.train_steps < 1:
        raise InvalidArgumentError("--steps and --train-steps must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out} is a file; give a folder")
    torch.manual_seed(args.seed)
    if args.text:
        result = demo.text(out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    else:
        result = demo.vision(out, steps=args.steps, seed=args.seed,
                             train_steps=args.train_steps, progress=not args.quiet)  # fmt: skip
    print(result)
    return 0


def _add_demo(commands: Any) -> None:
    """The `demo` command's arguments."""
    parser = commands.add_parser(
        "demo",
        help="the whole thing on a built-in default: train, swap, recover, export, serve",
        description="Train a small timm CNN with ReLU on scikit-learn's bundled digits (reused "
        "from --out when already trained there), swap to Serf, recover it with the original as "
        "teacher, export to ONNX, run it with onnxruntime, and print accuracy, latency and "
        "files. --text does the same for all-MiniLM-L6-v2 (the [minilm] extra). No downloads.",
    )
    parser.add_argument(
        "--out", default="serfswap-demo", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=300, help="recovery steps (default: 300)")
    parser.add_argument("--train-steps", type=int, default=300,
                      help="steps to train the ReLU original (default: 300)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="the sentence-embedding demo")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_demo)


def _check_export(args: argparse.Namespace) -> None:
    """export's arguments: OUT (after MODEL or -o, once), the opset, --input-shape's syntax,
    MODEL and --weights; before anything is loaded."""
    if args.output is not None and args.output_option is not None:
        raise InvalidArgumentError(
            f"OUT given twice ({args.output} and -o {args.output_option}): give it once, "
            "after MODEL or as -o OUT.onnx"
        )
    args.output = args.output if args.output is not None else args.output_option
    if args.output is None:
        args.parser.error("the following arguments are required: OUT.onnx (or -o OUT.onnx)")
    check_opset(args.opset)
    _shape_specs(args.input_shape)
    _check_model_arguments(args)
    if args.task in SEQ2SEQ_TASKS:  # OUT is a folder of three files (Optimum's layout)
        from ..io.paths import check_output_folder

        check_output_folder(args.output, [args.model, args.weights])
    else:
        _output(args)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.pipeline import export_onnx

    example_inputs = _example_inputs(args.input_shape)
    loaded = _load(args)
    if args.convert:
        _needs_module(loaded, "export --convert")
    progress(args, f"exporting to {args.output} and verifying it with onnxruntime ...")
    report = export_onnx(
        loaded.model,
        args.output,
        example_inputs,
        opset=args.opset,
        dynamic=False if args.static else (True if args.dynamic else None),
        dtype=args.dtype,
        decomposition=args.decomposition,
        verify=not args.no_verify,
        atol=args.atol,
        rtol=args.rtol,
        convert_activations=args.convert,
        functions=args.functions,
        task=args.task,
        exporter=args.exporter,
    )
    if args.task in SEQ2SEQ_TASKS and Path(args.model).is_dir():
        from ..export.seq2seq import copy_preprocessor_files

        copy_preprocessor_files(Path(args.model), Path(args.output))
    print(report)
    if report.leftovers and not args.convert:
        print("  hint: pass --convert to replace the activations that are left")
    return 0


def _add_export(commands: Any) -> None:
    """The `export` command's arguments."""
    parser = commands.add_parser(
        "export",
        help="export to ONNX, Serf as standard ops, verified against torch",
        description="Export MODEL to ONNX. The file is verified with onnxruntime against torch "
        "on fresh inputs before it is written; a failed export writes nothing.",
    )
    _add_model_arguments(parser)
    parser.add_argument("output", metavar="OUT.onnx", nargs="?",
                        help="the ONNX file to write (or -o OUT.onnx)")  # fmt: skip
    parser.add_argument("-o", "--output", dest="output_option", metavar="OUT.onnx",
                        help="the ONNX file to write, as convert and recover take it")  # fmt: skip
    parser.add_argument("--convert", action="store_true", help="convert activations first")
    parser.add_argument(
        "--decomposition",
        choices=list(DECOMPOSITIONS),
        default=DEFAULT_DECOMPOSITION,
        help="; ".join(f"{d.name}: {'/'.join(d.ops)}, {d.use}" for d in DECOMPOSITIONS.values())
        + f" (default: {DEFAULT_DECOMPOSITION})",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="default: %(default)s")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE)
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--static", action="store_true", help="fixed input shapes")
    shapes.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch and sequence or an error (default: dynamic where it exports and "
        "verifies, else a static sequence, else static shapes, said in the report)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE[:DTYPE]",
        help="an example input, e.g. 1,3,224,224 or 1,16:int64; once per positional input of "
        "forward() (needed for plain modules; timm and transformers inputs are inferred)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    tolerances = ", ".join(f"{atol:g} {dtype}" for dtype, (atol, _) in TOLERANCE.items())
    parser.add_argument("--atol", type=float, help=f"verification tolerance ({tolerances})")
    tolerances = ", ".join(f"{rtol:g} {dtype}" for dtype, (_, rtol) in TOLERANCE.items())
    parser.add_argument("--rtol", type=float, help=f"verification tolerance ({tolerances})")
    parser.add_argument(
        "--functions",
        action="store_true",
        help="each Serf as one call of the model-local ONNX function serfswap.Serf",
    )
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="torch's exporter: auto (default): dynamo, and where it fails, "
                        "TorchScript's; dynamo or torchscript: that one only")  # fmt: skip
    parser.add_argument("--task", choices=TASKS, default="default",
                        help="text-generation-with-past: a decoder with its KV cache, in "
                        "Optimum's layout (see `serfswap generate`); "
                        "text2text-generation-with-past (T5, BART, Marian...) and "
                        "automatic-speech-recognition-with-past (Whisper): an encoder-decoder "
                        "as Optimum's three files in the folder OUT")  # fmt: skip
    parser.set_defaults(func=cmd_export, check=_check_export)


_INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def _example_inputs(specs: list[str] | None) -> tuple[torch.Tensor, ...] | None:
    """--input-shape 1,3,224,224[:DTYPE], once per positional input of forward(). Floats are
    standard normal; integers are 0 or 1 (valid token ids for any vocabulary)."""
    import torch

    if not specs:
        return None
    tensors = []
    for shape, dtype_name in _shape_specs(specs):
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, dtype=dtype))
        else:
            tensors.append(torch.randint(0, 2, shape).to(dtype))
    return tuple(tensors)


def _shape_specs(specs: list[str] | None) -> list[tuple[list[int], str]]:
    """--input-shape's values as (shape, dtype name), checked without torch."""
    parsed = []
    for spec in specs or []:
        dims, _, dtype_name = spec.partition(":")
        dtype_name = dtype_name or "float32"
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not shape or any(d < 1 for d in shape):
            raise InvalidArgumentError(
                f"--input-shape {spec}: give positive sizes separated by commas, e.g. 1,3,224,224"
            )
        if dtype_name not in _INPUT_DTYPES:
            raise InvalidArgumentError(
                f"--input-shape {spec}: dtype {dtype_name!r} is not one of "
                + ", ".join(_INPUT_DTYPES)
            )
        parsed.append((shape, dtype_name))
    return parsed


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="timm:NAME, a HuggingFace model directory, a serfswap checkpoint, a state dict "
        "or .safetensors file (with --arch), a .pt2 torch.export program, or a pickled module",
    )
    parser.add_argument("--arch", help="timm:NAME or hf:DIR, for files that hold weights only")
    parser.add_argument("--weights", help="weights for a timm:NAME model")
    parser.add_argument(
        "--num-classes",
        type=int,
        help="classes of a timm model's head (default: read from the weights)",
    )
    parser.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help='more timm.create_model keywords, e.g. \'{"in_chans": 1, "drop_rate": 0.1}\'',
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="run code from MODEL/--weights if it needs to: a pickle naming more than the "
        "allowed model classes, or a .pt2 program (only for files you trust)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a HuggingFace folder's own code (auto_map) build the model or tokenizer "
        "(only for folders you trust)",
    )


def _add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include", nargs="+", help="glob patterns of module names to convert")
    parser.add_argument("--exclude", nargs="+", help="glob patterns of module names to leave")
    parser.add_argument(
        "--activations",
        nargs="+",
        help="families to replace (relu gelu silu mish hardswish ... or all); "
        "default: relu gelu silu mish",
    )
    parser.add_argument(
        "--no-audit",
        action="store_true",
        help="skip the run-time audit (one forward on inputs built from the model's config that "
        "lists activations that were to be converted and still run)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serfswap",
        description="Swap the activations of a model for Serf, recover it, export it to ONNX.",
        epilog="examples:\n"
        "  serfswap inspect timm:resnet50                 what would be converted\n"
        "  serfswap convert timm:resnet50 -o r50.safetensors\n"
        "  serfswap export r50.safetensors r50.onnx       ONNX with Serf as Softplus/Erf/Mul\n"
        "  serfswap export ./hf-model model.onnx --convert --decomposition exp-log\n"
        "  serfswap recover timm:resnet50 --data images/ --steps 300 -o r50.safetensors --plot\n"
        "  serfswap demo                                   the whole thing on digits, offline\n"
        "  serfswap env                                    versions, for bug reports",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"serfswap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_add_inspect, _add_convert, _add_export, _add_recover, _add_demo, _add_env):
        add(commands)
    add_generate_command(commands)
    for command in commands.choices.values():  # `serfswap export ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks of errors")  # fmt: skip
        command.set_defaults(parser=command)  # for errors in the subcommand's own usage
    return parser


# The Python API's option names, as the command line spells them.
_OPTION = re.compile(
    r"\b(activations|include|exclude|opset|num_classes)=((?:\[[^\]]*\])|(?:'[^']*')|\S+)"
)
# The same names with no value ("name them in include="), before a space, comma or the end.
_BARE_OPTION = re.compile(r"\b(activations|include|exclude)=(?=[\s,;:)]|$)")


def cli_words(message: str) -> str:
    """A library message in the command line's words: ``activations=['relu']`` becomes
    ``--activations relu``, since the user typed the latter."""

    def option(match: re.Match[str]) -> str:
        name, value = match.group(1).replace("_", "-"), match.group(2)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return f"--{name} {value}"
        if isinstance(parsed, list | tuple):
            return f"--{name} {' '.join(map(str, parsed))}"
        return f"--{name} {parsed}"

    message = re.sub(r"pass example_inputs \([^)]*\)",
                     "pass --input-shape, e.g. --input-shape 1,3,224,224", message)  # fmt: skip
    message = message.replace("see the plan)", "see `serfswap inspect`)")
    message = _BARE_OPTION.sub(lambda m: f"--{m.group(1)}", message)
    return _OPTION.sub(option, message)


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted recover leaves to continue from: its newest checkpoint and the flag
    that continues it (the same command with --resume), or that none was written yet."""
    if args.command != "recover" or "serfswap.recovery.state" not in sys.modules:
        return ""  # interrupted before training could write any checkpoint
    from ..recovery import state as trainstate

    try:
        folder = _checkpoint_dir(args, Path(args.output))
        found = trainstate.checkpoints(folder)
    except (SerfswapError, OSError):
        return ""
    if not found:
        return "; no checkpoint was written yet (--checkpoint-every sets how often)"
    return (
        f"; the newest checkpoint is {found[-1][1]} (step {found[-1][0]}): run the same command "
        "with --resume to continue from it"
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every ``finally`` removes what it staged."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not hasattr(args, "func"):
        if unknown:  # `serfswap --frob`: usage and the error, as argparse says any other
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if args.command == "export" and args.output is None and len(unknown) == 1:
        # `export MODEL -o X OUT`: argparse matched the optional OUT empty before the options
        args.output, unknown = (
            (unknown[0], []) if not unknown[0].startswith("-") else (None, unknown)
        )
    if unknown:  # the subcommand's usage, not the top-level one: it lists the options meant
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.debug:  # serfswap's own log, and onnxruntime's, which it silences otherwise
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("serfswap").setLevel(logging.DEBUG)
    # signal handlers can only be set from the main thread (main() may be called from others)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        # Every check that needs no model runs first, before torch or any library is imported:
        # a typo is answered in a fraction of a second, not after the model has loaded.
        getattr(args, "check", _check_nothing)(args)
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: staged files are gone by now
        if args.debug:
            raise
        terminated = isinstance(exc, _Terminated)
        print(f"serfswap {args.command}: {'terminated' if terminated else 'interrupted'}; "
              f"no partial file left{_resume_hint(args)}", file=sys.stderr)  # fmt: skip
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except SerfswapError as exc:
        if args.debug:
            raise
        print(f"serfswap {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the libraries' own failures: one line, status 1
        if args.debug:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"serfswap {args.command}: error: {reason} (--debug shows more)", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``serfswap`` script and ``python -m serfswap``: exit with :func:`main`'s status.

    After Ctrl-C or SIGTERM the process leaves at once with 130 / 143, everything staged being
    gone by then. Under load, 1 run in a few exited killed by SIGINT (status -2) although main()
    had caught the interrupt and returned 130: CPython ends a process with SIGINT when its
    "unhandled KeyboardInterrupt" flag is set, and C code that runs Python (pybind11's eval)
    sets it even for an interrupt that Python code then catches.
    """
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
