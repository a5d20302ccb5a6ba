"""Recovery sharded with FSDP2 under torchrun (two gloo processes on CPU): the same weights as
the single-process run of the same global batches, half the bytes per rank, layer matching on
sharded blocks, the consolidated checkpoint (written a tensor at a time), a teacher kept whole in
bfloat16, and sharded checkpoints that resume after a SIGKILL (bit-exact at the same world size,
and on one process) and from one process on two."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import serfswap
from serfswap.recovery import fsdp
from serfswap.recovery import state as trainstate
from tests.support.cli import ROOT, python, wait_for_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")

from tests.support import fsdp_run  # noqa: E402 (needs transformers)

SCRIPT = str(ROOT / "tests" / "support" / "fsdp_run.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# One thread: the runs compared must compute alike, and two busy cores are shared.
# PYTHONFAULTHANDLER: a rank that aborts (once in a dozen runs on a loaded machine, a rank
# ended with SIGABRT, "terminate called without an active exception", after writing its
# file) prints every thread's Python stack, which says where it was.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    proc = python(*args, env=ENV, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
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
    proc = run(*TORCHRUN, SCRIPT, str(sharded), "--steps", "5", "--fsdp", "--gathered")
    assert proc.stdout.count("done: 5 steps") == 2
    # Written a tensor at a time, the file is the one save_checkpoint writes of the whole
    # gathered state, byte for byte.
    assert sharded.read_bytes() == Path(f"{sharded}.gathered.safetensors").read_bytes()
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
    # No fit: it leaves a layer loss of bf16 rounding's size, and the check below needs the
    # swap's gap to see the bf16 passes close it.
    nofit = ("--fit-batches", "0")
    run(SCRIPT, str(single), "--steps", "5", *nofit)
    run(*TORCHRUN, SCRIPT, str(recomputed), "--steps", "5", "--fsdp",
        "--activation-checkpointing", *nofit)  # fmt: skip
    assert_close_weights(weights(single), weights(recomputed))
    run(*TORCHRUN, SCRIPT, str(bf16), "--steps", "5", "--fsdp", "--fsdp-bf16", *nofit)
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
    wait_for_checkpoint(child, folder / "step-00000002")
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


def test_a_bf16_teacher_in_one_process_takes_float_inputs_and_gives_float_outputs() -> None:
    """An image model: the teacher's float32 inputs are cast for it and its outputs back; the
    first step's loss is the float32 teacher's up to bfloat16's rounding (2**-8 relative on
    each value the loss averages); the hooks go after, the teacher stays bfloat16."""
    from tests.support.models import tiny_resnet

    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(2)]  # fmt: skip
    losses = []
    for dtype in (None, "bf16"):
        torch.manual_seed(0)
        teacher = tiny_resnet(num_classes=5).eval()
        student = serfswap.convert(teacher)
        result = serfswap.recover(student, teacher, images, steps=1, teacher_dtype=dtype,
                                  bn_batches=0, progress=False)  # fmt: skip
        losses.append(result.history[0]["loss"])
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert not teacher._forward_pre_hooks and not teacher._forward_hooks
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert losses[1] == pytest.approx(losses[0], rel=5e-3), losses  # measured 6e-4


@pytest.mark.slow  # two 2-rank runs: 60-80 s on the shared machine
def test_a_teacher_kept_whole_in_bf16_stays_near_the_sharded_teacher_run(tmp_path: Path) -> None:
    """``teacher_dtype="bf16"``: each rank holds the whole teacher in bfloat16, not a shard.
    Not equal to the sharded float32 teacher's run: the student learns from outputs rounded to
    bfloat16's 8 bits, and this converted student is so close to its teacher (first loss ~0.2)
    that the rounding is a sizeable part of what it learns from. So: the first step's loss
    within 3% (measured 1%), each tensor within 2e-2 of its scale (measured 7e-3), and the two
    runs' distance under half the distance they trained (measured 0.21)."""
    sharded, whole = tmp_path / "sharded.safetensors", tmp_path / "bf16.safetensors"
    # No fit: the checks below read the swap's gap closing (the fit leaves a layer loss of
    # the bf16 teacher's rounding's size) and the distance trained from the teacher's weights.
    nofit = ("--fit-batches", "0")
    run(*TORCHRUN, SCRIPT, str(sharded), "--steps", "5", "--fsdp", *nofit)
    run(*TORCHRUN, SCRIPT, str(whole), "--steps", "5", "--fsdp", "--teacher-dtype", "bf16", *nofit)
    teacher, _ = fsdp_run.models()
    total = sum(p.numel() for p in teacher.parameters())
    for rank in (0, 1):
        assert held(whole, rank)["teacher"] == {"dtypes": ["torch.bfloat16"], "numel": total}
        assert 0.45 <= held(sharded, rank)["teacher"]["numel"] / total <= 0.55  # its shard
    a, b = weights(sharded), weights(whole)
    assert all(v.dtype == torch.float32 for v in b.values())
    for name, value in a.items():
        assert (b[name] - value).abs().max().item() <= 2e-2 * value.abs().max().item(), name
    start = teacher.state_dict()

    def norm(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return sum(((x - y) ** 2).sum().item() for x, y in pairs) ** 0.5

    trained = norm([(a[k], start[k]) for k in a])
    assert trained > 1e-2, "the runs must have trained for the comparison to mean anything"
    assert norm([(a[k], b[k]) for k in a]) < 0.5 * trained
    first = held(sharded, 0)["loss"][0], held(whole, 0)["loss"][0]
    assert first[1] == pytest.approx(first[0], rel=0.03), first
    layer = held(whole, 0)["layer"]
    assert layer[-1] < layer[0]


@pytest.mark.slow  # a run on one process, then two: 50-60 s on the shared machine
def test_one_process_fsdp_checkpoint_resumes_on_two_ranks(tmp_path: Path) -> None:
    """An FSDP run on one process writes sharded checkpoints too; two ranks resume one (the
    shards re-cut, each rank taking the one process's RNG state) and end where the one process
    did, up to float summation order. Tied embeddings: stored once, sharded and gathered once,
    and the file written a tensor at a time is save_checkpoint's byte for byte."""
    folder, alone = tmp_path / "ckpt", tmp_path / "alone.safetensors"
    run(SCRIPT, str(alone), "--steps", "6", "--fsdp", "--tied", "--checkpoint-dir", str(folder),
        "--every", "2")  # fmt: skip
    assert [s for s, _ in trainstate.checkpoints(folder)] == [4, 6]
    assert trainstate.sharded(folder / "step-00000004")
    saved = torch.load(folder / "step-00000004" / "state.pt", weights_only=True)
    assert len(saved["rng"]) == 1 and saved["optimizer"] == {}, "the optimizer is in the shards"
    subprocess.run(["rm", "-r", str(folder / "step-00000006")], check=True)  # "crashed" at 5
    both = tmp_path / "both.safetensors"
    proc = run(*TORCHRUN, SCRIPT, str(both), "--steps", "6", "--fsdp", "--tied",
               "--checkpoint-dir", str(folder), "--every", "2", "--resume",
               "--gathered")  # fmt: skip
    assert proc.stdout.count("resumed from 4") == 2
    assert_close_weights(weights(alone), weights(both))
    assert both.read_bytes() == Path(f"{both}.gathered.safetensors").read_bytes()
    stored = weights(both)
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored


def test_a_sharded_run_refuses_a_whole_models_checkpoint(tmp_path: Path) -> None:
    """A checkpoint of a run without fsdp holds the optimizer state whole in state.pt: a
    sharded run says how to resume it instead of failing inside torch."""
    fsdp.check_whole_checkpoint(tmp_path, sharded=False)  # one process: it loads as it is
    with pytest.raises(serfswap.CheckpointError, match="written by a run without fsdp"):
        fsdp.check_whole_checkpoint(tmp_path, sharded=True)
