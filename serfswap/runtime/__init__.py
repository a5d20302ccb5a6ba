"""Running exported files: onnxruntime sessions (on the GPU when one can be used) and greedy
generation with an exported decoder."""

from .generate import generate
from .session import NoDeviceError, session

__all__ = ["NoDeviceError", "generate", "session"]
