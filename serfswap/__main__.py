"""``python -m serfswap`` runs the command line."""

from .cli import entry

entry()
