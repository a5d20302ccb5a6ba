"""The CLI as the third newcomer round met it (issue 23): each test runs a command as the user
did, on real models and real files, and checks what the user sees and what is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import serfswap

from .test_cli import run

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``serfswap ARGV`` in a fresh interpreter, as typed in a shell."""
    return subprocess.run(
        [sys.executable, "-m", "serfswap", *argv], capture_output=True, text=True, env=ENV,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real RGB images (scikit-learn's digits, coloured per class), 2 classes."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is in [dev]")
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    data = datasets.load_digits()
    for i in range(16):
        folder = root / str(data.target[i] % 2)
        folder.mkdir(exist_ok=True)
        gray = (data.images[i] * 15).astype("uint8")
        rgb = Image.merge("RGB", [Image.fromarray(gray // k) for k in (1, 2, 3)])
        rgb.resize((32, 32)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def gray_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-channel, 3-class test_resnet's state dict, saved with torch.save as users do."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=3)
    path = tmp_path_factory.mktemp("gray") / "gray_1ch.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kwargs", [[], ["--model-kwargs", '{"in_chans": 1}']])
def test_recover_a_grayscale_model_on_an_rgb_folder(
    kwargs: list[str], images: Path, gray_weights: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "gray.safetensors"
    code, stdout, err = run(capsys, "recover", "timm:test_resnet", "--weights", str(gray_weights),
                            "--data", str(images), "--steps", "2", "--batch-size", "4",
                            "--bn-batches", "1", "-o", str(out), *kwargs)  # fmt: skip
    assert code == 0, err
    assert "at 1x160x160 (grayscale)" in stdout, stdout
    shaped = "in_chans=1, num_classes=3" if not kwargs else "num_classes=3"
    assert f"timm:test_resnet shaped like its weights: {shaped}" in err, err
    model = serfswap.io.load_model(str(out)).model.eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
