"""Bad input and careless output paths: one line, the right status, nothing written, every input
unchanged. Reading and writing cases that are not attacks (those are in test_security.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.cli import cli, run
from tests.support.models import tiny_bert_config, tiny_resnet

from .test_cli import digest

timm = pytest.importorskip("timm", reason="timm is in the [timm] extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
onnx = pytest.importorskip("onnx")


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A serfswap checkpoint of timm's test_resnet (3 classes), as `serfswap convert` writes."""
    import serfswap
    from serfswap.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = serfswap.convert(tiny_resnet(num_classes=3))
    path = tmp_path_factory.mktemp("ckpt") / "c.safetensors"
    save_checkpoint(model, path)
    return path


def _with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(load_file(str(src)), str(dst), metadata=metadata)
    return dst


def _arch(checkpoint: Path, **fields: object) -> str:
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        arch = json.loads(f.metadata()["arch"])
    return json.dumps({**arch, **fields})


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("arch-not-json", "field 'arch' is not valid JSON"),
        ("arch-a-list", "field 'arch' is a list, not an object"),
        ("swap-missing", "without the 'swap' field"),
        ("kind-unknown", "checkpoint field arch.kind must be"),
        ("name-a-number", "checkpoint field arch.name must be a string"),
        ("classes-a-string", "checkpoint field arch.num_classes must be an integer"),
        ("classes-huge", "does not match its weights: shape of fc.weight: file (3, "),
        ("sites-not-strings", "checkpoint field swap.sites must be a list of strings"),
    ],
)
def test_malformed_checkpoint_metadata(
    case: str, expected: str, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    changes: dict[str, str | None] = {
        "arch-not-json": {"arch": "{not json"},
        "arch-a-list": {"arch": "[1, 2]"},
        "swap-missing": {"swap": None},
        "kind-unknown": {"arch": _arch(checkpoint, kind="pickle")},
        "name-a-number": {"arch": _arch(checkpoint, name=5)},
        "classes-a-string": {"arch": _arch(checkpoint, num_classes="ten")},
        # 10**12 classes: built for real this would need terabytes; the meta device needs none.
        "classes-huge": {"arch": _arch(checkpoint, num_classes=10**12)},
        "sites-not-strings": {"swap": json.dumps({"activations": ["relu"], "sites": [1]})},
    }[case]
    bad = _with_metadata(checkpoint, tmp_path / "bad.safetensors", **changes)
    before = digest(bad)
    code, _, err = run(capsys, "export", str(bad), str(tmp_path / "o.onnx"))
    assert code == 1 and expected in one_line(err)
    assert digest(bad) == before and not (tmp_path / "o.onnx").exists()


def test_declared_hidden_size_is_checked_against_the_weights(tmp_path: Path, capsys) -> None:
    import serfswap
    from serfswap.io.architectures import describe
    from serfswap.io.checkpoint import save_checkpoint

    cfg = tiny_bert_config()
    model = serfswap.convert(transformers.BertModel(cfg))
    good = tmp_path / "bert.safetensors"
    save_checkpoint(model, good)
    arch = describe(model)
    arch["config"]["hidden_size"] = 4096
    bad = _with_metadata(good, tmp_path / "bad.safetensors", arch=json.dumps(arch))
    code, _, err = run(capsys, "inspect", str(bad))
    assert code == 1 and "does not match its weights" in one_line(err)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "link-to-dev-zero"])
@pytest.mark.parametrize("role", ["model", "weights", "data"])
def test_non_regular_files_are_refused_unread(kind: str, role: str, tmp_path: Path) -> None:
    if kind == "dev-zero":
        special = Path("/dev/zero")
    elif kind == "fifo":
        special = tmp_path / "fifo"
        os.mkfifo(special)  # reading it would block forever: the timeout catches a regression
    else:
        special = tmp_path / "link.pt"
        special.symlink_to("/dev/zero")
    out = str(tmp_path / "o.safetensors")
    argv = {
        "model": ["inspect", str(special)],
        "weights": ["inspect", "timm:test_resnet", "--weights", str(special)],
        "data": ["recover", "timm:test_resnet", "--data", str(special), "--steps", "1", "-o", out],
    }[role]
    result = cli(*argv, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "not a regular file or directory" in one_line(result.stderr)


@pytest.fixture
def state_dict(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "sd.pt"
    torch.save(tiny_resnet().state_dict(), path)
    return path


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink"])
@pytest.mark.parametrize("command", ["export", "convert"])
def test_output_that_is_the_input_is_refused(
    how: str, command: str, state_dict: Path, tmp_path: Path, capsys
) -> None:
    if how == "same-path":
        out = state_dict
    elif how == "symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(state_dict)
    else:
        out = tmp_path / "hard.pt"
        os.link(state_dict, out)
    before = digest(state_dict)
    argv = [str(state_dict), "--arch", "timm:test_resnet"]
    argv += [str(out)] if command == "export" else ["-o", str(out)]
    code, _, err = run(capsys, command, *argv)
    assert code == 2 and "is the input" in one_line(err)
    assert digest(state_dict) == before


def test_recover_output_that_is_its_data_is_refused(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.txt"
    data.write_text("a\nb\nc\n")
    code, _, err = run(capsys, "recover", "timm:test_resnet", "--data", str(data),
                       "--steps", "1", "-o", str(data))  # fmt: skip
    assert code == 2 and "is the input" in one_line(err)
    assert data.read_text() == "a\nb\nc\n"


def test_output_over_a_file_of_the_input_folder_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tiny_bert_config()
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    capsys.readouterr()  # transformers' own progress bar
    weights = tmp_path / "bert" / "model.safetensors"
    before = digest(weights)
    code, _, err = run(capsys, "convert", str(tmp_path / "bert"), "-o", str(weights))
    assert code == 2 and "would overwrite a file of the input folder" in one_line(err)
    assert digest(weights) == before


def test_format_is_read_from_content_not_suffix(tmp_path: Path, capsys) -> None:
    converted = tmp_path / "conv.pt"  # a safetensors checkpoint under a .pt name
    code, _, err = run(capsys, "convert", "timm:test_resnet", "-o", str(converted))
    assert code == 0, err
    code, stdout, err = run(capsys, "export", str(converted), str(tmp_path / "out.onnx"))
    assert code == 0 and "verified with onnxruntime" in stdout, err
    state = tmp_path / "weights.safetensors"  # a torch.save state dict under the wrong suffix
    torch.save(tiny_resnet().state_dict(), state)
    code, _, err = run(capsys, "inspect", str(state), "--arch", "timm:test_resnet")
    assert code == 0, err


def test_output_named_as_a_folder_is_an_error_not_a_file(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "export", "timm:test_resnet", "-o", f"{tmp_path}/newdir/")
    assert code == 2 and "is a directory; give a file name" in one_line(err)
    # convert writes a HuggingFace folder there (issue 23): transformers models only
    code, _, err = run(capsys, "convert", "timm:test_resnet", "-o", f"{tmp_path}/newdir/")
    assert code == 2 and "a HuggingFace folder needs a transformers model" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_outputs_are_refused(tmp_path: Path, capsys) -> None:
    model = tiny_resnet()
    state = model.state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "export", str(tmp_path / "nan.pt"), str(out),
                       "--arch", "timm:test_resnet", "--convert")  # fmt: skip
    assert code == 2 and "NaN or inf" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]


def test_unsupported_opset_is_a_usage_error(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "export", "timm:test_resnet", str(tmp_path / "o.onnx"),
                       "--opset", "5")  # fmt: skip
    assert code == 2 and "opset 5 is not supported: use 18 to 25" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_report_states_the_opset_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.onnx"
    code, stdout, err = run(capsys, "export", "timm:test_resnet", str(out), "--opset", "21")
    assert code == 0, err
    written = [o.version for o in onnx.load(str(out)).opset_import if o.domain == ""]
    assert written == [21] and "opset 21," in stdout


def test_a_long_legal_output_name_works(tmp_path: Path, capsys) -> None:
    out = tmp_path / ("m" * 245 + ".onnx")  # 250 characters: NAME_MAX is 255
    code, _, err = run(capsys, "export", "timm:test_resnet", str(out))
    assert code == 0, err
    ckpt = tmp_path / ("c" * 238 + ".safetensors")
    code, _, err = run(capsys, "convert", "timm:test_resnet", "-o", str(ckpt))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, ckpt.name])
    data = tmp_path / "data.txt"
    data.write_text("a\nb\n")
    code, _, err = run(capsys, "recover", "timm:test_resnet", "--data", str(data), "--steps",
                       "1", "-o", str(tmp_path / ("r" * 238 + ".safetensors")))  # fmt: skip
    assert code == 2 and "too long a name here; pass --checkpoint-dir" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, ckpt.name, "data.txt"])


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_interrupted_export_leaves_nothing(sig: int, status: int, word: str,
                                           tmp_path: Path) -> None:  # fmt: skip
    """The signal arrives while the export is writing into its staging folder."""
    weights = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), weights)
    out = tmp_path / "o.onnx"
    process = subprocess.Popen(
        [sys.executable, "-m", "serfswap", "export", str(weights), "--arch", "timm:test_vit",
         str(out), "--convert"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".serfswap-") for p in tmp_path.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the export never staged anything"
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert word in one_line(err)
    assert list(tmp_path.iterdir()) == [weights], "no staging folder and no output left"
