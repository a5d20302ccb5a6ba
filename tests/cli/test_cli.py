"""The command line on every MODEL form, and every kind of bad input: one line, right status,
nothing written, input untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import serfswap
from serfswap.cli.main import main
from tests.support.cli import cli, run
from tests.support.models import tiny_bert_config, tiny_resnet

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file of each MODEL form, all of the timm test_resnet architecture."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = tiny_resnet().eval()
    paths = {
        "state_dict": root / "sd.pt",
        "checkpoint": root / "ckpt.pt",
        "safetensors": root / "w.safetensors",
        "pickle": root / "full.pt",
        "program": root / "prog.pt2",
        "hf": root / "hf",
    }
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, paths["checkpoint"])
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(paths["safetensors"]))
    torch.save(model, paths["pickle"])
    converted = serfswap.convert(model)
    with serfswap.keep_custom_op():  # the program keeps the op, which `export` maps exactly
        program = torch.export.export(converted, (torch.randn(2, 3, 64, 64),))
    torch.export.save(program, paths["program"])
    cfg = tiny_bert_config(num_hidden_layers=2)
    transformers.BertModel(cfg).save_pretrained(paths["hf"])
    return paths


@pytest.mark.parametrize(
    ("form", "extra"),
    [
        ("timm", []),
        ("state_dict", ["--arch", "timm:test_resnet"]),
        ("checkpoint", ["--arch", "timm:test_resnet"]),
        ("safetensors", ["--arch", "timm:test_resnet"]),
        ("pickle", []),
        ("program", ["--trust-pickle"]),  # a .pt2 can run code: only when trusted
        ("hf", []),
    ],
)
def test_export_every_model_form(
    form: str, extra: list[str], files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    source = "timm:test_resnet" if form == "timm" else str(files[form])
    before = digest(files[form]) if form not in ("timm", "hf") else None
    convert = [] if form == "program" else ["--convert"]
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", source, str(out), *convert, *extra)
    assert code == 0, err
    assert out.exists() and "no original activation left" in stdout
    assert "verified with onnxruntime" in stdout
    if before is not None:
        assert digest(files[form]) == before, "the input file is never modified"


def test_convert_writes_a_checkpoint_that_loads_without_pickles(
    files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    ckpt = tmp_path / "r.safetensors"
    code, stdout, err = run(
        capsys, "convert", str(files["state_dict"]), "--arch", "timm:test_resnet",
        "--exclude", "layer4.*", "-o", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "serfswap-checkpoint/1"
    assert json.loads(meta["arch"])["name"] == "test_resnet"
    loaded = serfswap.io.load_model(str(ckpt)).model
    expected = serfswap.convert(
        serfswap.io.load_model(str(files["state_dict"]), arch="timm:test_resnet").model,
        exclude="layer4.*",
    )
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)
    assert isinstance(loaded.layer4[0].act1, nn.ReLU)
    code, stdout, _ = run(capsys, "export", str(ckpt), str(tmp_path / "r.onnx"))
    assert code == 0 and "original activations left: Relu" in stdout


def test_inspect_prints_the_plan(files: dict[str, Path], capsys) -> None:
    code, stdout, _ = run(capsys, "inspect", str(files["hf"]))
    assert code == 0
    assert stdout.startswith("serfswap plan for BertModel: 2 to convert")


def test_pickle_with_foreign_code_is_refused_and_never_run(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pt"
    subprocess.run(
        [sys.executable, "-c", _EVIL.format(marker=str(marker), payload=str(payload))],
        check=True,
        timeout=120,
    )
    code, _, err = run(capsys, "export", str(payload), str(tmp_path / "m.onnx"))
    assert code == 1
    assert "--trust-pickle" in err and "io.open" in err
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "m.onnx").exists()


_EVIL = """
import torch
class Evil:
    def __reduce__(self):
        return (open, ({marker!r}, "w"))
torch.save({{"state_dict": Evil()}}, {payload!r})
"""


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("missing", 2, "no such file or directory"),
        ("dir-without-config", 2, "has no config.json"),
        ("truncated", 1, "not a readable PyTorch file"),
        ("other-format", 1, "unknown format"),
        ("corrupt-safetensors", 1, "not a readable .safetensors file"),
        ("unknown-arch", 2, "unknown timm architecture 'resnet_nope'"),
        ("mismatch", 1, "does not match the architecture: missing ['conv1.weight'"),
        ("weights-only", 2, "--arch timm:NAME"),
        ("no-output-dir", 2, "output directory"),
        ("verification", 1, "onnxruntime differs from torch"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(
    case: str, status: int, message: str, files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    args: list[str]
    if case == "missing":
        args = [str(tmp_path / "nope.pt"), str(out)]
    elif case == "dir-without-config":
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / "empty"), str(out)]
    elif case == "truncated":
        bad = tmp_path / "t.pt"
        bad.write_bytes(files["state_dict"].read_bytes()[:2000])
        args = [str(bad), str(out), "--arch", "timm:test_resnet"]
    elif case == "other-format":
        bad = tmp_path / "notes.pt"
        bad.write_text("these are not weights")
        args = [str(bad), str(out)]
    elif case == "corrupt-safetensors":
        bad = tmp_path / "c.safetensors"
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        args = [str(bad), str(out), "--arch", "timm:test_resnet"]
    elif case == "unknown-arch":
        args = [str(files["state_dict"]), str(out), "--arch", "timm:resnet_nope"]
    elif case == "mismatch":
        args = [str(files["state_dict"]), str(out), "--arch", "timm:resnet18"]
    elif case == "weights-only":
        args = [str(files["state_dict"]), str(out)]
    elif case == "no-output-dir":
        args = ["timm:test_resnet", str(tmp_path / "nope" / "m.onnx")]
    else:  # trained weights: with random ones a note that they are random comes first
        args = [str(files["state_dict"]), str(out), "--arch", "timm:test_resnet",
                "--convert", "--atol", "0", "--rtol", "0"]  # fmt: skip
    code, _, err = run(capsys, "export", *args)
    assert code == status, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(out.parent.iterdir()) == [], "nothing is written on failure"


def _read_only_directory(tmp_path: Path) -> Path:
    """A directory this process cannot write to: a mode 0500 folder for a normal user; for root,
    who writes through permission bits, a directory on a read-only mount (containers mount
    /proc/sys read-only)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked
    for candidate in (Path("/proc/sys"), Path("/sys")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("running as root, with no read-only mount to write into")


def test_read_only_output_directory(tmp_path: Path, capsys) -> None:
    locked = _read_only_directory(tmp_path)
    before = sorted(p.name for p in locked.iterdir())
    code, _, err = run(capsys, "export", "timm:test_resnet", str(locked / "m.onnx"))
    assert code == 2 and "not writable" in err
    assert sorted(p.name for p in locked.iterdir()) == before


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("--debug", "export", str(tmp_path / "x.pt"), "o.onnx")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "serfswap export" in capsys.readouterr().out
