"""``serfswap convert MODEL -o OUT``: the swap, written as a serfswap checkpoint or, with
``-o DIR/``, as a HuggingFace folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .loading import (
    add_model_arguments,
    add_swap_arguments,
    check_model_arguments,
    checkpoint_arch,
    load,
    needs_module,
    output_path,
    swap_options,
)


def check(args: argparse.Namespace) -> None:
    """convert's arguments and OUT (a checkpoint file, or a HuggingFace folder), before
    anything is loaded."""
    from ..io.paths import check_input_path, check_output_folder, wants_folder

    check_model_arguments(args)
    if not wants_folder(args.output):
        if args.files_from is not None:
            raise InvalidArgumentError(
                "--files-from goes with -o DIR/ (a HuggingFace folder)", option="--files-from"
            )
        output_path(args)
        return
    if args.model.startswith("timm:") and not Path(args.model).exists():
        raise InvalidArgumentError(
            f"a HuggingFace folder needs a transformers model, not {args.model}; write a "
            "serfswap checkpoint (-o FILE.safetensors) instead",
            option="--output",
        )
    check_output_folder(args.output, [args.model, args.weights, args.files_from])
    if args.files_from is not None and not check_input_path(args.files_from).is_dir():
        raise InvalidArgumentError(
            f"--files-from {args.files_from}: not a folder", option="--files-from"
        )


def run(args: argparse.Namespace) -> int:
    """Convert MODEL and write OUT."""
    from ..io.checkpoint import save_checkpoint
    from ..io.paths import wants_folder
    from ..rewrite.convert import convert

    if wants_folder(args.output):
        return _to_folder(args)
    out = output_path(args)
    loaded = load(args)
    needs_module(loaded, "convert")
    arch = checkpoint_arch(loaded)
    converted = convert(loaded.model, inplace=True, strict=args.strict, **swap_options(args))
    save_checkpoint(converted, out, arch=arch)
    print(converted.serfswap_report)
    print(f"wrote {out}; load it with serfswap.io.load_model({str(out)!r}) or `serfswap export`")
    return 0


def _to_folder(args: argparse.Namespace) -> int:
    """convert -o DIR/: MODEL (a HuggingFace folder, or a serfswap checkpoint of a transformers
    model, e.g. what recover wrote) converted and written with save_pretrained, the original
    folder's tokenizer and sentence-transformers files copied beside it: the way back from the
    command line to transformers and sentence-transformers."""
    from ..io.hf_folder import save_hf_folder
    from ..rewrite.convert import convert

    files_from = args.files_from
    if files_from is None and Path(args.model).is_dir():
        files_from = args.model
    loaded = load(args)
    needs_module(loaded, "convert")
    converted = convert(loaded.model, inplace=True, strict=args.strict, **swap_options(args))
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


def add_command(commands: Any) -> None:
    """The `convert` command's arguments."""
    parser = commands.add_parser(
        "convert",
        help="convert a model and write a serfswap checkpoint",
        description="Convert MODEL's activations to Serf and write a checkpoint (.safetensors: "
        "weights plus a description of the architecture and the swap; no pickled code).",
    )
    add_model_arguments(parser)
    add_swap_arguments(parser)
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
    parser.set_defaults(func=run, check=check)
