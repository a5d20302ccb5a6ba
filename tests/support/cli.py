"""The CLI as the tests run it: in this process (``main``, its output read from capsys) or in
a fresh interpreter, as a user types it in a shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The repository root: a subprocess gets it as PYTHONPATH when it must import ``tests``.
ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``serfswap ARGV`` in this process: its exit code, stdout and stderr."""
    from serfswap.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def python(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter, output captured as text; a failing exit is the
    caller's to assert on. stdin is /dev/null unless the caller passes ``stdin`` or ``input``,
    so that a command which prompts fails instead of waiting on the test's terminal."""
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False,
        **kwargs,
    )  # fmt: skip


def cli(*argv: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``serfswap ARGV`` in a fresh interpreter (see ``python`` for the keywords)."""
    return python("-m", "serfswap", *argv, timeout=timeout, **kwargs)


def wait_for_checkpoint(child: subprocess.Popen[bytes], path: Path, timeout: float = 300) -> None:
    """Wait until ``path`` (a checkpoint folder a running recovery writes) exists, so that a
    test can kill the run just after it: fails with the child's stderr if the child dies first,
    or after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert child.poll() is None, child.stderr.read().decode()[-3000:] if child.stderr else ""
        assert time.monotonic() < deadline, f"no checkpoint {path.name} after {timeout:g} s"
        time.sleep(0.005)
