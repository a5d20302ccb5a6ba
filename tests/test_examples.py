"""Every script in examples/ runs, in its --quick mode, the way a user would start it.

Parametrised over the glob of examples/*.py, so a new example is covered without editing this
file. Each runs in a subprocess (a fresh interpreter, as ``python examples/NAME.py``) from an
empty temporary directory, so an example that writes into the working directory or reads a
file relative to it fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))

pytest.importorskip("timm", reason="the examples need the [timm] extra")
pytest.importorskip("transformers", reason="the examples need the [hf] extra")


def test_there_are_examples() -> None:
    # An empty parametrisation would pass silently; so would a moved examples/ folder.
    assert EXAMPLES, "found no examples/*.py"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script: Path, tmp_path: Path) -> None:
    # One thread: --quick models are tiny, and two threads on two busy cores oversubscribe
    # (10x slower while anything else runs); no progress bars in the captured output.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, (
        f"{script.name} --quick exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    )
    assert result.stdout.strip(), f"{script.name} printed nothing"
    assert list(tmp_path.iterdir()) == [], f"{script.name} left files in the working directory"
