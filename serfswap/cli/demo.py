"""``serfswap demo``: the whole promise on a built-in default, offline (the demos themselves
are in :mod:`serfswap.cli.demos`, which imports torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..options import RecoveryOptions

STEPS = RecoveryOptions.STEPS


def run(args: argparse.Namespace) -> int:
    """Run the vision demo (or --text's) and print its table."""
    import torch

    from . import demos

    if args.steps < 1 or args.train_steps < 1:
        raise InvalidArgumentError("--steps and --train-steps must be at least 1", option="--steps")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out} is a file; give a folder", option="--out")
    torch.manual_seed(args.seed)
    if args.text:
        result = demos.text(out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    else:
        result = demos.vision(out, steps=args.steps, seed=args.seed,
                              train_steps=args.train_steps, progress=not args.quiet)  # fmt: skip
    print(result)
    return 0


def add_command(commands: Any) -> None:
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
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"recovery steps (default: {STEPS})")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=STEPS,
                        help=f"steps to train the ReLU original (default: {STEPS})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help="the sentence-embedding demo")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
