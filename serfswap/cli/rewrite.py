"""``serfswap rewrite IN.onnx OUT.onnx --target cpu|cuda`` (or ``--decomposition NAME``): the
Serf patterns of an ONNX file, exported by serfswap or elsewhere (Optimum, ``torch.onnx.export``),
rewritten into the decomposition that is fastest where the file will run, verified with
onnxruntime against the input file before it is written.

Also home of the export command's ``--target`` and ``--quantize`` options (:func:`add_speed_
arguments`), so that the choices of where a file runs are described once.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..onnx_ops.decompositions import DECOMPOSITIONS, TARGETS
from ..options import QUANTIZE


def _target_help() -> str:
    return (
        "where the file will run; picks the faster exact decomposition there ("
        + ", ".join(f"{target}: {name}" for target, name in TARGETS.items())
        + ")"
    )


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target``, ``--quantize`` and ``--optimize``, for the export command."""
    parser.add_argument("--target", choices=list(TARGETS), help=_target_help())
    parser.add_argument(
        "--quantize",
        choices=list(QUANTIZE),
        help="write the file dynamically quantised with onnxruntime: int8 weights per channel "
        "(int8) or per tensor; its accuracy against the fp32 export is printed",
    )
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="run onnxruntime's transformer optimizer on the file (fused Attention, "
        "SkipLayerNormalization...; for onnxruntime only), Serf kept, verified",
    )


def add_command(commands: Any) -> None:
    """The ``rewrite`` subcommand on ``commands`` (argparse's subparsers)."""
    parser = commands.add_parser(
        "rewrite",
        help="turn the Serf patterns of an ONNX file into the decomposition for a target",
        description="Rewrite every Serf pattern (x*erf(softplus(x)) as serfswap, Optimum or "
        "torch.onnx.export wrote it) of IN.onnx into the chosen decomposition and write "
        "OUT.onnx, verified with onnxruntime against IN.onnx on the same random inputs; a "
        "failed rewrite writes nothing.",
    )
    parser.add_argument("input", metavar="IN.onnx", help="the ONNX file to read")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--target", choices=list(TARGETS), help=_target_help())
    choice.add_argument(
        "--decomposition",
        choices=list(DECOMPOSITIONS),
        help="; ".join(f"{d.name}: {'/'.join(d.ops)}" for d in DECOMPOSITIONS.values()),
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..onnx_ops.retarget import retarget_file

    result = retarget_file(
        args.input, args.output, decomposition=args.decomposition, target=args.target,
        verify=not args.no_verify,
    )  # fmt: skip
    print(result)
    return 0
