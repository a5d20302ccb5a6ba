"""`serfswap recover` end to end: an image folder with a timm model, a text file with a
HuggingFace model and its tokenizer; resume, plot, and what it refuses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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


@pytest.mark.long
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


def test_recover_says_the_measures_in_the_users_terms(
    text_model: Path, tmp_path: Path, capsys
) -> None:
    """An embedding model: nearest-neighbour agreement and cosine before recovery, then
    before -> after next to the original's, with the pool the neighbours were searched in;
    --relational-weight reaches the run (its term is in the log)."""
    data = tmp_path / "lines.txt"
    data.write_text(TEXT)
    out, log = tmp_path / "bert.safetensors", tmp_path / "log.jsonl"
    code, stdout, err = run(capsys, "recover", str(text_model), "--data", str(data), "--steps",
                            "2", "--batch-size", "4", "--held-out", "0.5", "-o", str(out),
                            "--relational-weight", "2", "--log", str(log))  # fmt: skip
    assert code == 0, err
    agree = "nearest neighbours agree with the original's: "
    before = stdout.index("before recovery, " + agree)
    final = stdout.index(agree, stdout.index("serfswap recovery: 2 steps"))
    assert before < final
    line = stdout[final:].splitlines()[0]
    pattern = r"[01]\.\d{3} -> [01]\.\d{3} \(original 1\.000\), each searched among the 6 "
    assert re.fullmatch(agree + pattern + "examples of a held-out batch", line), line
    assert re.search(r"embedding cosine to the original's: \d\.\d{4} -> \d\.\d{4} "
                     r"\(original 1\.0000\)", stdout), stdout  # fmt: skip
    records = [json.loads(r) for r in log.read_text().splitlines()]
    assert 0 <= records[-1]["held_out_agreement"] <= 1, records  # evaluated every 2 / 10 steps
    assert "held_out_cosine" in records[0]
    # the second batch holds the 2 last training lines: one neighbour each, nothing to rank
    assert records[0]["relational"] > 0 and records[1]["relational"] == 0, records


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


def test_a_bad_lr_is_refused_before_anything_loads(tmp_path: Path) -> None:
    """The numbers are checked first, before MODEL or --data is read and before torch is
    imported: a bad --lr is the error even when MODEL and --data do not exist."""
    argv = ["recover", str(tmp_path / "no-model.pt"), "--data", str(tmp_path / "no-data"),
            "--steps", "10", "--lr", "-1", "-o", str(tmp_path / "o.safetensors")]  # fmt: skip
    script = (
        "import sys; from serfswap.cli.main import main; code = main(sys.argv[1:]); "
        "print(code, sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert result.stdout.split() == ["2", "[]"], (result.stdout, result.stderr)
    assert result.stderr.strip() == (
        "serfswap recover: error: --lr -1.0: give a positive learning rate, e.g. 1e-4"
    )
    # with good numbers, the next check fails: --data (MODEL is read last, by the loader)
    argv[argv.index("-1")] = "1e-4"
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert result.stdout.split()[0] == "2", (result.stdout, result.stderr)
    assert "no-data: no such file" in result.stderr, result.stderr


def test_recover_options_come_from_recovery_options() -> None:
    """Each RecoveryOptions field the command offers is a flag with the field's default and
    help; the run's options are built from them (evaluations and checkpoints every tenth of
    the run unless given)."""
    from dataclasses import fields

    from serfswap.cli import recover as command
    from serfswap.cli.main import build_parser
    from serfswap.options import RecoveryOptions

    parser = build_parser()
    args = parser.parse_args(["recover", "timm:x", "--data", "d", "--steps", "50", "-o", "o"])
    offered = [f for f in fields(RecoveryOptions) if f.metadata]
    assert {f.name for f in offered} >= {"lr", "warmup", "blend", "bn_batches", "keep", "resume"}
    for f in offered:
        default = f.metadata["argparse"].get("default", f.default)
        assert getattr(args, f.name) == default, f.name
    options = command._options(args, Path("ck"))
    assert options == RecoveryOptions(checkpoint_dir=Path("ck"), eval_every=5, checkpoint_every=5)
    args = parser.parse_args(["recover", "timm:x", "--data", "d", "--steps", "50", "-o", "o",
                              "--lr", "3e-4", "--train", "converted", "--resume"])  # fmt: skip
    options = command._options(args, Path("ck"))
    assert (options.lr, options.train, options.resume) == (3e-4, "converted", True)
    help_text = parser._subparsers._group_actions[0].choices["recover"].format_help()
    expected = ("peak learning rate (AdamW; warmup, then cosine decay to 0; default: 1e-4, and "
                "2e-5 for embedding models)")  # fmt: skip
    assert expected in " ".join(help_text.split())
