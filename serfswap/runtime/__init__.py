"""Running exported files: onnxruntime sessions (on the GPU when one can be used) and greedy
generation with an exported decoder or encoder-decoder."""

from .generate import generate
from .seq2seq import generate_seq2seq
from .session import NoDeviceError, session

__all__ = ["NoDeviceError", "generate", "generate_seq2seq", "session"]
