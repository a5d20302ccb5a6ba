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


def _tiny_speech2text() -> transformers.PreTrainedModel:
    config = transformers.Speech2TextConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, conv_channels=16,
        input_feat_per_channel=8, input_channels=2, max_source_positions=64,
        max_target_positions=32,
    )  # fmt: skip
    return transformers.Speech2TextModel(config)


def test_speech2text_is_audited_on_inferred_filter_banks(tmp_path: Path, capsys) -> None:
    from serfswap.inputs import example_inputs_for

    model = _tiny_speech2text()
    inputs = example_inputs_for(model, batch=2, seq=8)
    # [batch, frames, input_feat_per_channel * input_channels]; two stride-2 convolutions
    assert inputs["input_features"].shape == (2, 32, 16)
    model.save_pretrained(tmp_path / "s2t")
    code, stdout, err = run(capsys, "convert", str(tmp_path / "s2t"),
                            "-o", str(tmp_path / "s2t.safetensors"))  # fmt: skip
    assert code == 0, err
    assert "2 converted (nn.ReLU x2)" in stdout and "not audited" not in stdout, stdout


def test_a_model_whose_inputs_cannot_be_inferred_converts_unaudited(tmp_path: Path, capsys) -> None:
    """PatchTST's main input is past_values (a time series), which inference does not know:
    the default convert goes on without the audit and says why; --strict refuses."""
    config = transformers.PatchTSTConfig(num_input_channels=2, context_length=32,
                                         patch_length=8, patch_stride=8, d_model=16,
                                         num_attention_heads=2, num_hidden_layers=1,
                                         ffn_dim=32)  # fmt: skip
    transformers.PatchTSTModel(config).save_pretrained(tmp_path / "patchtst")
    out = tmp_path / "p.safetensors"
    code, stdout, err = run(capsys, "convert", str(tmp_path / "patchtst"), "-o", str(out))
    assert code == 0, err
    assert "(not audited at run time)" in stdout
    assert "not audited at run time: its inputs could not be inferred (ExampleInputsError: " \
           "cannot infer example inputs for main input 'past_values')" in stdout  # fmt: skip
    assert out.is_file()
    code, _, err = run(capsys, "convert", str(tmp_path / "patchtst"), "-o",
                       str(tmp_path / "strict.safetensors"), "--strict")  # fmt: skip
    assert code == 2 and "cannot infer inputs for a PatchTSTModel" in err, err
    assert not (tmp_path / "strict.safetensors").exists()


def test_inspect_shows_a_plan_that_converts_nothing(tmp_path: Path, capsys) -> None:
    """efficientvit_b0's default-family activations are all linear-attention feature maps
    (kept); the rest are Hardswish. inspect and plan() show that; convert refuses, in CLI words."""
    plan = serfswap.plan(timm.create_model("efficientvit_b0", pretrained=False))
    assert not plan.converted and len(plan.skipped) == 28
    assert "activations=['all'] converts them" in plan.notes[-1]
    code, stdout, err = run(capsys, "inspect", "timm:efficientvit_b0")
    assert code == 0, err
    assert "serfswap plan for EfficientVit: 0 to convert, 28 left as they are" in stdout
    assert "skip: family 'hardswish' not selected (--activations)" in stdout
    assert "skip: positivity constraint, " in stdout
    hint = stdout.splitlines()[-1]
    assert hint.startswith("  note: nothing to convert: every activation of EfficientVit"), hint
    assert "name them in --include or add 'positivity' to --activations" in hint
    assert "families ['hardswish'], which --activations leaves out: --activations all" in hint
    assert "=" not in hint.split("see")[0], "no Python keyword left in the CLI's words"
    out = tmp_path / "e.safetensors"
    code, _, err = run(capsys, "convert", "timm:efficientvit_b0", "-o", str(out))
    assert code == 2 and "see `serfswap inspect`" in err and "--activations all" in err, err
    assert not out.exists()
