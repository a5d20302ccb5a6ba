"""Reading and writing models without running code from files: the ``load_model`` entry (what
MODEL may be on the command line, :mod:`.load`), architectures (:mod:`.architectures`), format
sniffing and weights (:mod:`.formats`), the safe unpickler (:mod:`.safe_pickle`), serfswap's
checkpoint format (:mod:`.checkpoint`), HuggingFace folders (:mod:`.hf_folder`), remote-code
refusal and the checks on paths."""

from .architectures import Loaded, build_arch, describe
from .checkpoint import load_checkpoint, save_checkpoint
from .hf_folder import save_hf_folder
from .load import load_model

__all__ = [
    "Loaded",
    "build_arch",
    "describe",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_hf_folder",
]
