"""`serfswap recover` runs in their own processes, as a user starts them: killed with a real
SIGKILL and resumed (bit-exact to an uninterrupted run, for each data source the CLI reads),
finished runs rerun and extended, checkpoints kept or removed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serfswap.cli.main import main
from serfswap.recovery import state as trainstate
from serfswap.recovery.schedule import lr_factor
from tests.support.cli import ROOT, cli, wait_for_checkpoint
from tests.support.data import TEXT
from tests.support.models import tiny_resnet

# One thread: the runs compared must compute alike, and two busy cores are shared.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def serfswap(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = cli("recover", *args, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.fixture(scope="module")
def sources(
    image_folder: Path,
    text_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[str]]:
    """The MODEL and --data arguments of each CLI data source. The timm teacher's weights come
    from a file: `timm:NAME` alone has fresh random weights in each process."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    torch.save(tiny_resnet().state_dict(), root / "resnet.pt")
    (root / "lines.txt").write_text(TEXT)
    return {
        # 36 training images in batches of 8: a seeded DataLoader that reshuffles on each pass,
        # and a model with BatchNorm, re-estimated on 3 batches before the first step.
        "images": ["timm:test_resnet", "--weights", str(root / "resnet.pt"), "--data",
                   str(image_folder), "--batch-size", "8", "--bn-batches", "3"],
        # 11 training lines in batches of 4: a fixed list of tokenised batches.
        "text": [str(text_model), "--data", str(root / "lines.txt"), "--batch-size", "4",
                 "--lr", "1e-3"],
    }  # fmt: skip


# Steps per source: enough that the run is still going when the test sees its first checkpoint.
STEPS = {"images": 8, "text": 200}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("source", ["images", "text"])
def test_killed_with_sigkill_and_resumed_ends_with_the_uninterrupted_weights(
    source: str, sources: dict[str, list[str]], tmp_path: Path
) -> None:
    common = [*sources[source], "--steps", str(STEPS[source]), "--checkpoint-every", "2"]
    serfswap(*common, "-o", str(tmp_path / "straight.safetensors"))

    killed, folder = tmp_path / "killed.safetensors", tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-m", "serfswap", "recover", *common, "-o", str(killed),
         "--checkpoint-dir", str(folder)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for_checkpoint(child, folder / "step-00000002")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not killed.exists(), "the run ended before the kill"
    done = max(step for step, _ in trainstate.checkpoints(folder))
    assert done < STEPS[source]

    proc = serfswap(*common, "-o", str(killed), "--checkpoint-dir", str(folder), "--resume")
    assert f"at step {done} of {STEPS[source]}" in proc.stdout
    assert_same_weights(tmp_path / "straight.safetensors", killed)
    assert not folder.exists(), "a finished run's checkpoints are removed once OUT is written"


@pytest.mark.slow
def test_a_finished_run_reruns_and_extends(sources: dict[str, list[str]], tmp_path: Path) -> None:
    out, log = tmp_path / "r.safetensors", tmp_path / "log.jsonl"
    folder = tmp_path / "r.safetensors.checkpoints"
    base = [*sources["text"], "-o", str(out), "--checkpoint-every", "2", "--log", str(log)]

    # Default: the checkpoints go once OUT is written, and the same command simply runs again.
    first = serfswap(*base, "--steps", "4")
    assert not folder.exists() and "removed the run's 2 checkpoint(s)" in first.stdout
    four = weights(out)
    serfswap(*base, "--steps", "4", "--keep-checkpoints")
    assert [s for s, _ in trainstate.checkpoints(folder)] == [2, 4]
    assert all(torch.equal(v, four[k]) for k, v in weights(out).items()), "runs are repeatable"

    # With the checkpoints kept, rerunning starts over (it replaces the finished run)...
    again = serfswap(*base, "--steps", "4", "--keep-checkpoints")
    assert "held a finished run of 4 steps: starting over" in again.stdout
    assert [s for s, _ in trainstate.checkpoints(folder)] == [2, 4]
    # ...a run cannot be shortened...
    short = serfswap(*base, "--steps", "3", "--resume", check=False)
    assert short.returncode == 2 and "cannot be shortened" in short.stderr, short.stderr
    # ...and --resume with more steps extends it: a new warmup then cosine over the added steps.
    ext = serfswap(*base, "--steps", "8", "--resume", "--keep-checkpoints")
    assert "extending the finished run of 4 steps to 8" in ext.stdout, ext.stdout
    assert "resumed at step 4" in ext.stdout
    rates = [json.loads(line)["lr"] for line in log.read_text().splitlines()]
    # The log's lr is the rate after each step, as planned then: to 0 at step 4, then restarted.
    expected = [1e-3 * lr_factor(k, [(0, 4)] if k <= 4 else [(0, 4), (4, 8)], 0.1)
                for k in range(1, 9)]  # fmt: skip
    assert rates == pytest.approx(expected, rel=1e-12) and rates[3] == 0 and rates[4] > 0
    extended = weights(out)
    assert any(not torch.equal(v, four[k]) for k, v in extended.items())

    # An extension resumes like any run: killed after step 6, it ends where it would have.
    shutil.rmtree(folder / "step-00000008")
    out.unlink()
    proc = serfswap(*base, "--steps", "8", "--resume")
    assert "at step 6 of 8" in proc.stdout
    for name, value in weights(out).items():
        assert torch.equal(value, extended[name]), name
    assert not folder.exists()


@pytest.mark.slow
def test_keep_and_an_unfinished_run_is_never_started_over(
    sources: dict[str, list[str]], tmp_path: Path
) -> None:
    out, folder = tmp_path / "r.safetensors", tmp_path / "r.safetensors.checkpoints"
    base = [*sources["text"], "-o", str(out), "--checkpoint-every", "1", "--steps", "4"]
    serfswap(*base, "--keep", "1", "--keep-checkpoints")
    assert [s for s, _ in trainstate.checkpoints(folder)] == [4]
    serfswap(*base, "--keep", "2", "--keep-checkpoints")
    assert [s for s, _ in trainstate.checkpoints(folder)] == [3, 4]
    shutil.rmtree(folder / "step-00000004")  # as if killed between steps 3 and 4

    refused = serfswap(*base, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "unfinished recovery run (step 3 of 4)" in refused.stderr
    assert "--resume" in refused.stderr
    longer = serfswap(*base[:-1], "9", "--resume", check=False)
    assert longer.returncode == 2 and "finish it first" in longer.stderr, longer.stderr
    assert [s for s, _ in trainstate.checkpoints(folder)] == [3], "left as it was"


def test_recover_help_shows_the_api_options_and_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--batch-size BATCH_SIZE examples per step (default: 32)",
                  "(default: 0.1)", "--blend", "--bn-batches", "(0: off; default: 20)",
                  "--eval-every", "--keep KEEP", "--keep-checkpoints", "more --steps"):  # fmt: skip
        assert shown in text, shown


def test_recover_option_errors_speak_cli(sources: dict[str, list[str]], capsys,
                                         tmp_path: Path) -> None:  # fmt: skip
    out = str(tmp_path / "o.safetensors")
    for bad, message in ((["--keep", "0"], "--keep"), (["--warmup", "2"], "--warmup"),
                         (["--blend", "-1"], "--blend"), (["--bn-batches", "-1"], "--bn-batches"),
                         (["--eval-every", "-2"], "--eval-every")):  # fmt: skip
        code = main(["recover", *sources["text"], "--steps", "1", "-o", out, *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("error:") == 1, err
        assert not Path(out).exists()
