"""The package as users meet it: cheap import, the CLI, and README commands that CI runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import serfswap
from tests.support.cli import python

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return python(*args, timeout=120)


def test_import_is_cheap_and_leaves_cuda_alone() -> None:
    probe = (
        "import sys, serfswap, torch\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'timm', 'transformers')"
        " if m in sys.modules]\n"
        "print(heavy, torch.cuda.is_initialized())\n"
    )
    result = run("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


def test_cli_version() -> None:
    result = run("-m", "serfswap", "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"serfswap {serfswap.__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "serfswap"
    assert script.exists(), "pip install -e . should have written the serfswap console script"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.stdout.strip() == f"serfswap {serfswap.__version__}"


def test_cli_env_reports_versions_and_accelerators() -> None:
    import onnxruntime
    import torch

    result = run("-m", "serfswap", "env", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["onnxruntime"] == onnxruntime.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["onnxruntime_providers"] == onnxruntime.get_available_providers()
    for key in ("onnx", "onnxscript", "timm", "transformers", "onnxruntime_cuda_provider"):
        assert key in info
    table = run("-m", "serfswap", "env")
    assert re.search(r"^torch\s+\S+", table.stdout, re.MULTILINE)


def test_cli_without_command_prints_help_and_fails() -> None:
    result = run("-m", "serfswap")
    assert result.returncode == 2
    assert "usage: serfswap" in result.stdout


def readme_commands() -> list[str]:
    """The README's shell commands, in order, from its ```sh blocks."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_commands() -> None:
    commands = readme_commands()
    install_and_run, install_and_test = commands[0], commands[1]
    assert "serfswap" in install_and_run and "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_run in ci.splitlines()
    assert install_and_test in ci.splitlines()


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch) -> None:
    """Every ```python block of the README and of the docs pages runs as written, each on its
    own in a folder of its own (a reader copies one block, not the page), so the docs cannot
    drift; a block that recovers must show recovery (better after than before)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [
        (page.relative_to(ROOT), block)
        for page in pages
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
    ]
    assert len({page for page, _ in blocks}) > 1, "the README and at least one docs page"
    for number, (page, block) in enumerate(blocks):
        folder = tmp_path / f"block-{number}"
        folder.mkdir()
        monkeypatch.chdir(folder)  # the export examples write their files here
        names: dict[str, object] = {}
        exec(compile(block, str(page), "exec"), names)
        result = names.get("result")
        if isinstance(result, serfswap.RecoveryResult):
            for metric in ("agreement", "cosine"):
                assert result.after[metric] > result.before[metric], str(result)


def test_docs_generated_tables_are_current() -> None:
    from .readme_tables import rendered

    stale = [str(page) for page, (text, new) in rendered().items() if new != text]
    assert not stale, f"stale: {stale}; run: python -m tests.readme_tables --write"


def test_a_stale_generated_table_is_caught() -> None:
    """The freshness check above can fail: a page whose table lost a row renders differently."""
    from .readme_tables import PAGES, render

    text = PAGES["activations"].read_text()
    row = next(line for line in text.splitlines() if line.startswith("| relu |"))
    stale = text.replace(row + "\n", "")
    assert stale != text and render(stale, ["activations"]) != stale


def test_docstring_examples_run() -> None:
    import doctest
    import importlib

    for name in ("serfswap.ops.serf", "serfswap.rewrite.convert", "serfswap.names"):
        module = importlib.import_module(name)
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, name


def test_the_installed_versions_are_the_lock() -> None:
    """The venv runs what constraints.txt pins (the README's commands install with it), so
    CI tests the versions a clean install gets. scripts/check-latest installs the newest
    releases on purpose and says so with SERFSWAP_UNLOCKED=1. (The compatibility venv, locked
    by constraints-compat.txt, does not run this file.)"""
    import importlib.metadata
    import os

    if os.environ.get("SERFSWAP_UNLOCKED") == "1":
        pytest.skip("scripts/check-latest: the newest releases, not the lock")
    lock = "constraints.txt"
    pinned = dict(
        line.split("==", 1)
        for line in (ROOT / lock).read_text().splitlines()
        if line and not line.startswith("#")
    )
    differ = {}
    for name, version in pinned.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this venv did not install
        if installed != version:
            differ[name] = (installed, version)
    assert not differ, f"installed (pinned in {lock}): {differ}"


@pytest.mark.parametrize("order", ["import torch, serfswap", "import serfswap, torch"])
def test_the_custom_op_exists_once_serfswap_and_torch_are_imported(order: str, tmp_path) -> None:
    """A torch.export program that keeps serfswap::serf loads and runs after `import serfswap`,
    in either import order, though the package imports torch lazily."""
    import torch

    program = tmp_path / "serf.pt2"
    with serfswap.keep_custom_op():
        exported = torch.export.export(serfswap.Serf(), (torch.randn(3),))
    torch.export.save(exported, program)
    probe = (
        f"{order}\n"
        f"program = torch.export.load({str(program)!r})\n"
        "print(program.module()(torch.tensor([1.0, 0.0, -1.0]))[0].item())\n"
    )
    result = run("-c", probe)
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout) - 0.9367) < 1e-4


@pytest.mark.parametrize("module", ["formula", "blocks", "serf"])
def test_any_op_module_can_be_imported_first(module: str) -> None:
    """Importing torch runs the hook that imports serfswap.ops.serf, which imports formula and
    blocks: a fresh interpreter whose first import is one of them must not find it half made."""
    result = run("-c", f"from serfswap.ops import {module}")
    assert result.returncode == 0, result.stderr
