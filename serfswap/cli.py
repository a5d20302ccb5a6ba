"""The ``serfswap`` command: a thin shell over the Python API.

One plain function per command. Heavy imports (onnx, onnxruntime, timm, transformers) happen
inside the commands, so ``serfswap --help`` is instant. User errors (:class:`SerfswapError`)
print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SerfswapError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serfswap",
        description="Swap the activations of a model for Serf, recover it, export it to ONNX.",
        epilog="examples:\n  serfswap env            versions and accelerators, for bug reports\n"
        "  serfswap env --json     the same as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"serfswap {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="print versions and accelerators, for bug reports")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SerfswapError as exc:
        print(f"serfswap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
