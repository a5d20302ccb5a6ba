"""The ``serfswap`` command: a thin shell over the Python API.

One module per command (``add_command`` declares its arguments, ``check`` refuses a slip before
anything heavy is imported, ``run`` runs it); this one assembles the parser and holds the
process's policy: signals, exit statuses, how errors print. Heavy imports (onnx, onnxruntime,
timm, transformers) happen inside the commands, so ``serfswap --help`` is instant. User errors
(:class:`SerfswapError`) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .._version import __version__
from ..errors import SerfswapError, first_line
from . import convert, demo, env, export, generate, inspect, recover, rewrite


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, ``--debug`` accepted after the command too."""
    parser = argparse.ArgumentParser(
        prog="serfswap",
        description="Swap the activations of a model for Serf, recover it, export it to ONNX.",
        epilog="examples:\n"
        "  serfswap inspect timm:resnet50                 what would be converted\n"
        "  serfswap convert timm:resnet50 -o r50.safetensors\n"
        "  serfswap export r50.safetensors r50.onnx       ONNX with Serf as Softplus/Erf/Mul\n"
        "  serfswap export ./hf-model model.onnx --convert --decomposition exp-log\n"
        "  serfswap recover timm:resnet50 --data images/ --steps 300 -o r50.safetensors --plot\n"
        "  serfswap demo                                   the whole thing on digits, offline\n"
        "  serfswap env                                    versions, for bug reports",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"serfswap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for command in (inspect, convert, export, recover, demo, env, generate, rewrite):
        command.add_command(commands)
    for sub in commands.choices.values():  # `serfswap export ... --debug` works too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks of errors")  # fmt: skip
        sub.set_defaults(parser=sub)  # for errors in the subcommand's own usage
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every ``finally`` removes what it staged."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _check_nothing(args: argparse.Namespace) -> None:
    """The commands whose arguments need no check before they run."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names; its exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not hasattr(args, "func"):
        if unknown:  # `serfswap --frob`: usage and the error, as argparse says any other
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if args.command == "export" and args.output is None and len(unknown) == 1:
        # `export MODEL -o X OUT`: argparse matched the optional OUT empty before the options
        args.output, unknown = (
            (unknown[0], []) if not unknown[0].startswith("-") else (None, unknown)
        )
    if unknown:  # the subcommand's usage, not the top-level one: it lists the options meant
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.debug:  # serfswap's own log, and onnxruntime's, which it silences otherwise
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("serfswap").setLevel(logging.DEBUG)
    # signal handlers can only be set from the main thread (main() may be called from others)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        # Every check that needs no model runs first, before torch or any library is imported:
        # a typo is answered in a fraction of a second, not after the model has loaded.
        getattr(args, "check", _check_nothing)(args)
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: staged files are gone by now
        if args.debug:
            raise
        terminated = isinstance(exc, _Terminated)
        print(f"serfswap {args.command}: {'terminated' if terminated else 'interrupted'}; "
              f"no partial file left{recover.resume_hint(args)}", file=sys.stderr)  # fmt: skip
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except SerfswapError as exc:
        if args.debug:
            raise
        print(f"serfswap {args.command}: error: {exc.cli_message()}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the libraries' own failures: one line, status 1
        if args.debug:
            raise
        print(f"serfswap {args.command}: error: {first_line(exc)} (--debug shows more)",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``serfswap`` script and ``python -m serfswap``: exit with :func:`main`'s status.

    After Ctrl-C or SIGTERM the process leaves at once with 130 / 143, everything staged being
    gone by then. Under load, 1 run in a few exited killed by SIGINT (status -2) although main()
    had caught the interrupt and returned 130: CPython ends a process with SIGINT when its
    "unhandled KeyboardInterrupt" flag is set, and C code that runs Python (pybind11's eval)
    sets it even for an interrupt that Python code then catches.
    """
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
