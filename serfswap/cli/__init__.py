"""The ``serfswap`` command: a thin shell over the Python API."""

from .main import entry, main

__all__ = ["entry", "main"]
