"""``serfswap inspect MODEL``: the plan of the swap, changing nothing."""

from __future__ import annotations

import argparse
import ast
import re
from typing import Any

from .loading import (
    add_model_arguments,
    add_swap_arguments,
    check_model_arguments,
    load,
    needs_module,
    swap_options,
)

# The plan's text names the Python API's options (its site reasons and notes are stored as
# text in the pickled Plan); as the command line spells them for `inspect`. Errors do not go
# through this: they carry their options (SerfswapError.cli_message).
_OPTION = re.compile(
    r"\b(activations|include|exclude|opset|num_classes)=((?:\[[^\]]*\])|(?:'[^']*')|\S+)"
)
# The same names with no value ("name them in include="), before a space, comma or the end.
_BARE_OPTION = re.compile(r"\b(activations|include|exclude)=(?=[\s,;:)]|$)")


def cli_words(message: str) -> str:
    """The plan's text in the command line's words: ``activations=['relu']`` becomes
    ``--activations relu``, since the user typed the latter."""

    def option(match: re.Match[str]) -> str:
        name, value = match.group(1).replace("_", "-"), match.group(2)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return f"--{name} {value}"
        if isinstance(parsed, list | tuple):
            return f"--{name} {' '.join(map(str, parsed))}"
        return f"--{name} {parsed}"

    message = re.sub(r"pass example_inputs \([^)]*\)",
                     "pass --input-shape, e.g. --input-shape 1,3,224,224", message)  # fmt: skip
    message = message.replace("see the plan)", "see `serfswap inspect`)")
    message = _BARE_OPTION.sub(lambda m: f"--{m.group(1)}", message)
    return _OPTION.sub(option, message)


def run(args: argparse.Namespace) -> int:
    """Print the plan of MODEL's swap."""
    from ..rewrite.convert import plan

    loaded = load(args)
    needs_module(loaded, "inspect")
    # The plan shows even when nothing would be converted (convert refuses that): its notes
    # say why, in the command line's words.
    print(cli_words(str(plan(loaded.model, **swap_options(args)))))
    return 0


def add_command(commands: Any) -> None:
    """The `inspect` command's arguments."""
    parser = commands.add_parser(
        "inspect",
        help="the plan: which activations, where, how many, what would be left",
        description="Print what `serfswap convert` would change, changing nothing.",
    )
    add_model_arguments(parser)
    add_swap_arguments(parser)
    parser.set_defaults(func=run, check=check_model_arguments)
