"""Reading and writing models without running code from files: the ``load_model`` entry (what
MODEL may be on the command line), architectures, format sniffing, the safe unpickler,
serfswap's checkpoint format, remote-code refusal and the checks on paths."""

from .load import (
    Loaded,
    build_arch,
    describe,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_hf_folder,
)

__all__ = [
    "Loaded",
    "build_arch",
    "describe",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_hf_folder",
]
