"""``python -m serfswap`` runs the command line."""

from .cli.main import entry

entry()
