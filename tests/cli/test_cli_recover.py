"""`serfswap recover` end to end: an image folder with a timm model, a text file with a
HuggingFace model and its tokenizer; resume, plot, and what it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import serfswap
from serfswap.cli.main import main
from tests.support.cli import run
from tests.support.data import TEXT
from tests.support.models import tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Trained-model stand-in for timm:test_resnet: recover refuses random weights."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(tiny_resnet().state_dict(), str(path))
    return str(path)


def test_recover_an_image_folder_then_export(
    image_folder: Path, weights: str, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the [plot] extra")
    out = tmp_path / "r.safetensors"
    code, stdout, err = run(capsys, "recover", "timm:test_resnet", "--weights", weights,
                            "--data", str(image_folder),
                            "--steps", "4", "--batch-size", "8", "-o", str(out), "--plot",
                            "--log", str(tmp_path / "log.jsonl"), "--bn-batches", "2")  # fmt: skip
    assert code == 0, err
    said = ["loading timm:test_resnet", "data: ", "evaluating the converted model on 1 held-out "
            "batch (before)", "re-estimating BatchNorm statistics on 2 batches",
            "serfswap recovery: 4 steps"]  # fmt: skip
    where = [stdout.find(line) for line in said]
    assert -1 not in where and where == sorted(where), stdout  # what it does, as it does it
    assert "40 images" in stdout and "36 train, 4 held out" in stdout
    assert "serfswap recovery: 4 steps" in stdout
    assert (tmp_path / "r.safetensors.curves.png").read_bytes().startswith(b"\x89PNG")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4
    loaded = serfswap.io.load_model(str(out))
    assert len(loaded.model.serfswap_report.converted) > 0
    assert out.stat().st_mode & 0o044, "readable by others, as files usually are"
    code, stdout, err = run(capsys, "export", str(out), str(tmp_path / "r.onnx"))
    assert code == 0, err
    assert (tmp_path / "r.onnx").is_file()


def test_recover_a_text_file_and_resume(text_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "lines.txt"
    data.write_text(TEXT + "\n\n")
    out = tmp_path / "bert.safetensors"
    args = ["recover", str(text_model), "--data", str(data), "--steps", "4", "--batch-size",
            "4", "-o", str(out), "--checkpoint-every", "2", "--lr", "1e-3"]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "12 lines" in stdout and "GELUActivation" in stdout
    first = serfswap.io.load_model(str(out)).model.state_dict()
    report = stdout[stdout.index("metric") :]
    before = float(report.split("cosine")[1].split()[0])
    after = float(report.split("cosine")[1].split()[1])
    assert after > before, report

    checkpoints = Path(f"{out}.checkpoints")
    assert not checkpoints.exists(), "removed once OUT is written"
    code, stdout, err = run(capsys, *args, "--keep-checkpoints")  # a rerun: just runs
    assert code == 0, err
    assert "kept the checkpoints" in stdout
    shutil.rmtree(checkpoints / "step-00000004")  # as if killed between steps 2 and 4
    out.unlink()
    code, stdout, err = run(capsys, *args, "--resume")
    assert code == 0, err
    assert "resumed at step 2" in stdout
    again = serfswap.io.load_model(str(out)).model.state_dict()
    for name, value in first.items():
        assert torch.equal(value, again[name]), name


def test_recover_refuses_what_it_cannot_do(
    image_folder: Path, text_model: Path, weights: str, tmp_path: Path, capsys
) -> None:
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["timm:test_resnet", "--data", str(image_folder)], "random weights here; pass --weights"),
        (["timm:test_resnet", "--data", str(tmp_path / "nope")], "no such file"),
        (["timm:test_resnet", "--weights", weights, "--data", str(tmp_path)], "Found 0 images"),
        (["timm:test_resnet", "--data", str(tmp_path), "--batch-size", "0"], "--batch-size"),
        (["timm:test_resnet", "--data", str(image_folder), "--device", "cuda:7"], "CUDA"),
        ([str(text_model), "--data", str(image_folder)], "pretrained_cfg"),
    ]
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cases.append((["timm:test_resnet", "--weights", weights, "--data", str(text)], "tokenizer"))
    converted = tmp_path / "c.safetensors"
    assert main(["convert", "timm:test_resnet", "-o", str(converted)]) == 0
    capsys.readouterr()
    cases.append(([str(converted), "--data", str(image_folder)], "already converted"))
    for argv, message in cases:
        if message == "CUDA" and torch.cuda.is_available():
            continue
        code, _, err = run(capsys, "recover", *argv, "--steps", "1", "-o", out)
        assert code == 2, (argv, err)
        assert message in err and err.count("error:") == 1, err  # one error line
        assert not Path(out).exists()
