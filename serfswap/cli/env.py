"""``serfswap env``: versions and accelerators, for bug reports."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from typing import Any

from .._version import __version__

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


def run(args: argparse.Namespace) -> int:
    """Print :func:`environment` as a table, or as JSON with --json."""
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


def add_command(commands: Any) -> None:
    """The `env` command's arguments."""
    parser = commands.add_parser("env", help="print versions and accelerators, for bug reports")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
