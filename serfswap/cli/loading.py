"""What the commands that read a model share: MODEL's arguments and their checks (before torch
is imported), loading it with notes on stderr, OUT's check, the swap's options, and the progress
line of slow steps."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..io.architectures import Loaded


def progress(args: argparse.Namespace, message: str) -> None:
    """One line on stderr saying what a slow step is doing (loading, exporting), when stderr is
    a terminal: seconds to minutes of silence look like a hang; a log or a pipe keeps only the
    command's result and its errors."""
    if sys.stderr.isatty():
        print(f"serfswap {args.command}: {message}", file=sys.stderr, flush=True)


def load(args: argparse.Namespace, *, quiet: bool = False) -> Loaded:
    """MODEL as the arguments describe it; the loader's notes go to stderr."""
    from ..io.load import load_model

    if not quiet:
        progress(args, f"loading {args.model} ...")
    loaded = load_model(
        args.model,
        arch=args.arch,
        weights=args.weights,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
        timm_kwargs=timm_kwargs(args),
    )
    for note in loaded.notes:
        print(f"serfswap {args.command}: note: {note}", file=sys.stderr)
    return loaded


def check_model_arguments(args: argparse.Namespace) -> None:
    """MODEL, --weights and the timm keywords, checked without loading anything: an ONNX file
    where a PyTorch model is read, a folder given as --weights, --model-kwargs that is not
    JSON are refused before torch is imported."""
    from ..io.paths import check_weights_path, is_onnx, onnx_given

    if is_onnx(Path(args.model)):
        raise InvalidArgumentError(onnx_given(args.model), option="MODEL")
    if args.weights is not None:
        check_weights_path(args.weights)
    timm_kwargs(args)


def timm_kwargs(args: argparse.Namespace) -> dict[str, object] | None:
    """--model-kwargs (a JSON object) and --num-classes, for timm.create_model."""
    kwargs: dict[str, object] = {}
    if args.model_kwargs is not None:
        try:
            parsed = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"--model-kwargs is not JSON ({exc})", option="--model-kwargs"
            ) from None
        if not isinstance(parsed, dict):
            raise InvalidArgumentError(
                "--model-kwargs takes a JSON object, e.g. '{\"in_chans\": 1}'",
                option="--model-kwargs",
            )
        kwargs.update(parsed)
    if args.num_classes is not None:
        if args.num_classes < 0:
            raise InvalidArgumentError(
                "--num-classes must be >= 0 (0: no classifier)", option="--num-classes"
            )
        kwargs["num_classes"] = args.num_classes
    return kwargs or None


def hf_arch_dir(args: argparse.Namespace) -> str | None:
    """The folder of ``--arch hf:DIR``: an input, like MODEL."""
    return args.arch[3:] if args.arch and args.arch.startswith("hf:") else None


def output_path(args: argparse.Namespace, *extra_inputs: str | None) -> Path:
    """OUT, checked before anything is loaded: writable, and none of the command's inputs."""
    from ..io.paths import check_output_path

    inputs = [args.model, args.weights, hf_arch_dir(args), *extra_inputs]
    return check_output_path(args.output, inputs)


def beside(out: Path, suffix: str, option: str) -> Path:
    """A default name derived from OUT, refused up front when the folder cannot hold a name
    that long (OUT may legally be 255 bytes; OUT.checkpoints then is not)."""
    path = out.with_name(out.name + suffix)
    if len(os.fsencode(path.name)) > os.pathconf(out.parent, "PC_NAME_MAX"):
        raise InvalidArgumentError(
            f"the default {path.name[:20]}...{suffix} is too long a name here; pass {option}",
            option=option.split()[0],
        )
    return path


def swap_options(args: argparse.Namespace) -> dict[str, object]:
    """The swap's keywords of convert() and plan(), from --include/--exclude/..."""
    return {
        "include": args.include,
        "exclude": args.exclude,
        "activations": args.activations,
        "audit": False if args.no_audit else None,
    }


def needs_module(loaded: Loaded, command: str) -> None:
    """Refuse a torch.export program where a command changes or inspects a module."""
    import torch

    if isinstance(loaded.model, torch.export.ExportedProgram):
        raise InvalidArgumentError(
            f"{command} needs a module, and {loaded.source} is a torch.export program; "
            "convert the module before torch.export, then `serfswap export` the program",
            option="MODEL",
        )


def checkpoint_arch(loaded: Loaded) -> dict[str, Any]:
    """How the output checkpoint describes MODEL's architecture, without pickled code."""
    from ..io.architectures import describe

    arch = loaded.arch or describe(loaded.model)
    if arch is None:
        raise InvalidArgumentError(
            f"cannot describe the architecture of {loaded.source} ({type(loaded.model).__name__}) "
            "for a checkpoint without pickled code (timm and transformers models only)",
            option="MODEL",
        )
    return arch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the options that say how to read it."""
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


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose what convert() replaces."""
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
