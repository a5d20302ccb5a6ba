"""``serfswap export MODEL OUT.onnx``: ONNX, Serf as standard ops, verified against torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from ..onnx_ops.decompositions import DECOMPOSITIONS
from ..onnx_ops.decompositions import DEFAULT as DEFAULT_DECOMPOSITION
from ..options import (
    DEFAULT_DTYPE,
    DEFAULT_OPSET,
    DTYPE_NAMES,
    EXPORTERS,
    SEQ2SEQ_TASKS,
    TASKS,
    TOLERANCE,
    check_opset,
)
from .loading import (
    add_model_arguments,
    check_model_arguments,
    load,
    needs_module,
    output_path,
    progress,
)
from .rewrite import add_speed_arguments

if TYPE_CHECKING:
    import torch


def check(args: argparse.Namespace) -> None:
    """export's arguments: OUT (after MODEL or -o, once), the opset, --input-shape's syntax,
    MODEL and --weights; before anything is loaded."""
    if args.output is not None and args.output_option is not None:
        raise InvalidArgumentError(
            f"OUT given twice ({args.output} and -o {args.output_option}): give it once, "
            "after MODEL or as -o OUT.onnx",
            option="--output",
        )
    args.output = args.output if args.output is not None else args.output_option
    if args.output is None:
        args.parser.error("the following arguments are required: OUT.onnx (or -o OUT.onnx)")
    check_opset(args.opset)
    _shape_specs(args.input_shape)
    check_model_arguments(args)
    if args.task in SEQ2SEQ_TASKS:  # OUT is a folder of three files (Optimum's layout)
        from ..io.paths import check_output_folder

        check_output_folder(args.output, [args.model, args.weights])
    else:
        output_path(args)


def run(args: argparse.Namespace) -> int:
    """Export MODEL to OUT.onnx and print the report."""
    from ..export.pipeline import export_onnx

    inputs = example_inputs(args.input_shape)
    loaded = load(args)
    if args.convert:  # in place: the command owns the model, and a copy holds its weights twice
        from ..rewrite.convert import convert

        needs_module(loaded, "export --convert")
        loaded.model = convert(loaded.model, inplace=True, example_inputs=inputs)
    progress(args, f"exporting to {args.output} and verifying it with onnxruntime ...")
    report = export_onnx(
        loaded.model,
        args.output,
        inputs,
        opset=args.opset,
        dynamic=False if args.static else (True if args.dynamic else None),
        dtype=args.dtype,
        decomposition=args.decomposition,
        target=args.target,
        quantize=args.quantize,
        optimize=args.optimize,
        verify=not args.no_verify,
        atol=args.atol,
        rtol=args.rtol,
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


def add_command(commands: Any) -> None:
    """The `export` command's arguments."""
    parser = commands.add_parser(
        "export",
        help="export to ONNX, Serf as standard ops, verified against torch",
        description="Export MODEL to ONNX. The file is verified with onnxruntime against torch "
        "on fresh inputs before it is written; a failed export writes nothing.",
    )
    add_model_arguments(parser)
    parser.add_argument("output", metavar="OUT.onnx", nargs="?",
                        help="the ONNX file to write (or -o OUT.onnx)")  # fmt: skip
    parser.add_argument("-o", "--output", dest="output_option", metavar="OUT.onnx",
                        help="the ONNX file to write, as convert and recover take it")  # fmt: skip
    parser.add_argument("--convert", action="store_true", help="convert activations first")
    parser.add_argument(
        "--decomposition",
        choices=list(DECOMPOSITIONS),
        help="; ".join(f"{d.name}: {'/'.join(d.ops)}, {d.use}" for d in DECOMPOSITIONS.values())
        + f" (default: --target's, else {DEFAULT_DECOMPOSITION})",
    )
    add_speed_arguments(parser)
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
    parser.set_defaults(func=run, check=check)


_INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def example_inputs(specs: list[str] | None) -> tuple[torch.Tensor, ...] | None:
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
                f"--input-shape {spec}: give positive sizes separated by commas, e.g. 1,3,224,224",
                option="--input-shape",
            )
        if dtype_name not in _INPUT_DTYPES:
            raise InvalidArgumentError(
                f"--input-shape {spec}: dtype {dtype_name!r} is not one of "
                + ", ".join(_INPUT_DTYPES),
                option="--input-shape",
            )
        parsed.append((shape, dtype_name))
    return parsed
