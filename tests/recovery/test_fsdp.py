"""Recovery sharded with FSDP2 under torchrun (two gloo processes on CPU): the same weights as
the single-process run of the same global batches, half the bytes per rank, layer matching on
sharded blocks, the consolidated checkpoint, and sharded checkpoints that resume after a
SIGKILL (bit-exact at the same world size, and on one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import serfswap
from serfswap.recovery import fsdp
from serfswap.recovery import state as trainstate
from tests.support.cli import ROOT, python

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

from tests.support import fsdp_run  # noqa: E402 (needs transformers)

SCRIPT = str(ROOT / "tests" / "support" / "fsdp_run.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# One thread: the runs compared must compute alike, and two busy cores are shared.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    proc = python(*args, env=ENV, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def held(out: Path, rank: int) -> dict[str, Any]:
    return json.loads(Path(f"{out}.rank{rank}.json").read_text())


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Within 1e-4 of each tensor's scale: the runs differ only in float summation order."""
    assert a.keys() == b.keys()
    for name, value in a.items():
        scale = value.abs().max().item()
        assert (b[name] - value).abs().max().item() <= 1e-4 * scale, name


def test_blocks_are_the_repeated_layers() -> None:
    teacher, _ = fsdp_run.models()
    assert fsdp.blocks(teacher) == list(teacher.model.layers)


def test_the_fsdp_options_need_fsdp() -> None:
    for name in ("fsdp_bf16", "activation_checkpointing"):
        with pytest.raises(serfswap.InvalidArgumentError, match="needs fsdp=True") as caught:
            serfswap.RecoveryOptions(**{name: True})
        assert caught.value.option == name
    assert serfswap.RecoveryOptions(fsdp=True, fsdp_bf16=True, activation_checkpointing=True)


def test_fsdp_over_two_ranks_follows_the_single_process_run(tmp_path: Path) -> None:
    """Same global batches, same weights (within float summation order; layer matching on,
    its variance taken over the global batch), and each rank holds half the parameters,
    gradients and AdamW moments."""
    single, sharded = tmp_path / "single.safetensors", tmp_path / "fsdp.safetensors"
    run(SCRIPT, str(single), "--steps", "5")
    proc = run(*TORCHRUN, SCRIPT, str(sharded), "--steps", "5", "--fsdp")
    assert proc.stdout.count("done: 5 steps") == 2
    a, b = weights(single), weights(sharded)
    teacher, _ = fsdp_run.models()
    moved = max((a[k] - v).abs().max().item() for k, v in teacher.state_dict().items())
    assert moved > 1e-3, "the runs must have trained for the comparison to mean anything"
    assert_close_weights(a, b)
    # The consolidated file is a serfswap checkpoint: `serfswap export` reads it.
    student = serfswap.load_checkpoint(sharded)
    assert type(student).__name__ == "LlamaForCausalLM" and student.serfswap_report.converted
    whole = held(single, 0)["local_bytes"]
    assert whole["params"] == 4 * sum(p.numel() for p in teacher.parameters())
    for rank in (0, 1):
        part = held(sharded, rank)["local_bytes"]
        for kind in ("params", "grads", "optimizer"):
            assert 0.45 <= part[kind] / whole[kind] <= 0.55, (rank, kind, part, whole)


@pytest.mark.slow
def test_activation_checkpointing_and_bf16_on_sharded_blocks(tmp_path: Path) -> None:
    """Recomputing each block's activations changes nothing; bf16 passes keep float32 shards
    (the file is float32) and stay near the float32 run, with the layer loss falling."""
    single, recomputed, bf16 = (tmp_path / f"{n}.safetensors" for n in ("one", "ac", "bf16"))
    run(SCRIPT, str(single), "--steps", "5")
    run(*TORCHRUN, SCRIPT, str(recomputed), "--steps", "5", "--fsdp",
        "--activation-checkpointing")  # fmt: skip
    assert_close_weights(weights(single), weights(recomputed))
    run(*TORCHRUN, SCRIPT, str(bf16), "--steps", "5", "--fsdp", "--fsdp-bf16")
    a, b = weights(single), weights(bf16)
    assert all(v.dtype == torch.float32 for v in b.values())
    for name, value in a.items():
        assert (b[name] - value).abs().max().item() <= 2e-2 * value.abs().max().item(), name
    for rank in (0, 1):
        layer = held(bf16, rank)["layer"]
        assert len(layer) == 5 and layer[-1] < layer[0]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (read from /proc: Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def killed_run(tmp_path: Path, folder: Path, steps: int) -> list[int]:
    """A 2-rank FSDP run with checkpoints every 2 steps, killed (every process of the job,
    SIGKILL) once the checkpoint of step 2 is in place; the checkpoints left."""
    child = subprocess.Popen(
        [sys.executable, *TORCHRUN, SCRIPT, str(tmp_path / "killed.safetensors"), "--steps",
         str(steps), "--fsdp", "--checkpoint-dir", str(folder), "--every", "2", "--delay",
         "0.5"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (folder / "step-00000002").is_dir():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.01)
    # The machine goes down: both ranks (torchrun starts each in a session of its own) and
    # the agent, all at once.
    for pid in [*descendants(child.pid), child.pid]:
        os.kill(pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "killed.safetensors").exists(), "the run ended before the kill"
    done = [step for step, _ in trainstate.checkpoints(folder)]
    assert done and max(done) < steps
    assert trainstate.sharded(folder / f"step-{max(done):08d}")
    return done


@pytest.mark.slow
def test_killed_fsdp_run_resumes_bit_exact_and_on_one_process(tmp_path: Path) -> None:
    steps = 8
    straight = tmp_path / "straight.safetensors"
    run(*TORCHRUN, SCRIPT, str(straight), "--steps", str(steps), "--fsdp")
    folder = tmp_path / "ckpt"
    done = killed_run(tmp_path, folder, steps)
    kept = tmp_path / "kept"  # the same checkpoints, for the resume on one process
    subprocess.run(["cp", "-r", str(folder), str(kept)], check=True)

    resumed = tmp_path / "resumed.safetensors"
    proc = run(*TORCHRUN, SCRIPT, str(resumed), "--steps", str(steps), "--fsdp",
               "--checkpoint-dir", str(folder), "--every", "2", "--resume")  # fmt: skip
    assert proc.stdout.count(f"resumed from {max(done)}") == 2
    a, b = weights(straight), weights(resumed)
    for name, value in a.items():
        assert torch.equal(value, b[name]), name

    # The 2-rank checkpoint, re-cut for one process (no process group): the run goes on and
    # ends where the 2-rank run does, up to float summation order.
    alone = tmp_path / "alone.safetensors"
    proc = run(SCRIPT, str(alone), "--steps", str(steps), "--fsdp", "--checkpoint-dir",
               str(kept), "--every", "2", "--resume")  # fmt: skip
    assert f"resumed from {max(done)}" in proc.stdout
    assert_close_weights(a, weights(alone))
