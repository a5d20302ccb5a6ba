"""Export every per-family timm model of the zoo to ONNX and verify it against torch (issue 17).

CI exports only the 18 ``test_*`` architectures (``test_timm_export``); the ~90 per-family
models take 30 to 60 minutes more on 2 cores, so they are swept by hand with this script and
the result goes to docs/models.md and benchmarks/RESULTS.md.

Each model is converted and exported exactly as ``tests/zoo/check.py:check_export`` does
(``activations="all"``, positivity constraints kept; ``export_onnx``'s defaults; batch 2) in a
subprocess of its own, under ``nice -n 10``, with one torch thread and a timeout, so that a model
that hangs or runs out of memory costs its own line only. One JSON line per model is appended to
the output file as soon as it is known; a second run skips the models already there (resume).

    python benchmarks/zoo_export_sweep.py [--out benchmarks/zoo_export_sweep.jsonl]
        [--timeout 1200] [--models NAME ...] [--test-models] [--original] [--retry-failed]

``--original`` exports the unconverted model instead: a failure that the original shares is the
exporter's, not serfswap's. ``--models`` restricts the sweep to the names given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' zoo lists

from tests.zoo import timm_zoo  # noqa: E402

# Models that take longest to export on 2 shared cores (measured in the first sweep): swept last,
# so an interrupted sweep has covered the most families.
SLOW_LAST = [
    "beit_base_patch16_224", "vitamin_small_224", "volo_d1_224", "tnt_s_patch16_224",
    "nasnetalarge", "pnasnet5large", "inception_resnet_v2", "inception_v4", "tresnet_m",
    "convmixer_1024_20_ks9_p14", "sequencer2d_s", "nextvit_small", "twins_svt_small",
    "swinv2_cr_tiny_224", "swinv2_tiny_window8_256", "swin_tiny_patch4_window7_224", "davit_tiny",
    "gcvit_tiny", "focalnet_tiny_lrf", "mvitv2_tiny", "coat_tiny", "hiera_tiny_224",
]  # fmt: skip


def export_one(name: str, original: bool) -> dict[str, Any]:
    """In the child: build, convert (unless ``original``), export and verify one model."""
    import torch

    import serfswap
    from tests.zoo.check import check_export, prepare

    torch.set_num_threads(1)
    model, inputs = timm_zoo.build(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        if not original:
            report = check_export(model, inputs, path)  # raises on any failure
            assert report is not None
            return {"ok": True, "exporter": report.exporter, "why": report.exporter_note}
        # check_export's steps without the conversion: prepare, batch 2, export_onnx's defaults.
        batch2 = {k: torch.randn(2, *v.shape[1:], dtype=v.dtype) for k, v in inputs.items()}
        report = serfswap.export_onnx(prepare(model), path, example_inputs=batch2)
        return {"ok": bool(report.verified), "exporter": report.exporter}


def child(name: str, original: bool) -> None:
    """Print one JSON object: ok, or the error's class, first line and (shortened) message."""
    try:
        result = export_one(name, original)
    except Exception as exc:  # the sweep records every kind of failure
        message = str(exc)
        result = {
            "ok": False,
            "error": type(exc).__name__,
            "first_line": message.strip().splitlines()[0] if message.strip() else "",
            "message": message[:1500],
        }
    print("SWEEP-RESULT " + json.dumps(result), flush=True)


def run_child(name: str, original: bool, timeout: float) -> dict[str, Any]:
    """Run :func:`child` for ``name`` in a niced subprocess; a hang or a kill is a result too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = ["nice", "-n", "10", sys.executable, __file__, "--child", name]
    command += ["--original"] if original else []
    start = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "Timeout", "first_line": f"no result in {timeout:.0f} s",
                "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
    seconds = round(time.monotonic() - start, 1)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("SWEEP-RESULT "):
            return {**json.loads(line.removeprefix("SWEEP-RESULT ")), "seconds": seconds}
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"ok": False, "error": f"exit {proc.returncode}", "first_line": tail,
            "seconds": seconds}  # fmt: skip


def known_failure(name: str, result: dict[str, Any]) -> bool | None:
    """Whether a failure is the one EXPORT_FAILURES lists for the model (None: not listed)."""
    if name not in timm_zoo.EXPORT_FAILURES:
        return None
    return bool(re.search(timm_zoo.EXPORT_FAILURES[name][0], result.get("message", "")))


def order(names: list[str]) -> list[str]:
    """The slowest models last, in :data:`SLOW_LAST`'s order."""
    slow = [n for n in SLOW_LAST if n in names]
    return [n for n in names if n not in slow] + slow


def done(out: Path, retry_failed: bool) -> set[str]:
    if not out.exists():
        return set()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["name"] for r in rows if r["ok"] or not retry_failed}


def summary(out: Path) -> str:
    """Counts by outcome over the file's last row per model, and the total time."""
    rows = timm_zoo.sweep_results(out)
    counts: dict[str, int] = {}
    for row in rows.values():
        key = "exported and verified" if row["ok"] else f"failed: {row['error']}"
        counts[key] = counts.get(key, 0) + 1
    total = sum(r["seconds"] for r in rows.values())
    lines = [f"{n:3d}  {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    lines.append(f"{len(rows)} models, {total / 60:.0f} min in all")
    for name, row in rows.items():
        if not row["ok"]:
            known = "known" if known_failure(name, row) else "NOT in EXPORT_FAILURES"
            diff = re.search(r"max abs diff [^ ]+, max rel diff [^ )]+", row["first_line"])
            what = diff.group(0) if diff else row["first_line"].removeprefix("the exporter: ")
            lines.append(f"failed  {name} ({known}): {row['error']}: {what[:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=timm_zoo.SWEEP)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per model")
    parser.add_argument("--models", nargs="+", help="only these model names")
    parser.add_argument("--test-models", action="store_true", help="add the test_* models")
    parser.add_argument("--original", action="store_true", help="export unconverted models")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed models")
    parser.add_argument("--summary", action="store_true", help="only print --out's summary")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.original)
        return
    if args.summary:
        print(summary(args.out))
        return
    names = list(timm_zoo.FAMILIES.values())
    names = (list(timm_zoo.TEST_MODELS) if args.test_models else []) + order(names)
    names = [n for n in names if not args.models or n in args.models]
    skip = done(args.out, args.retry_failed)
    for name in (n for n in names if n not in skip):
        result = run_child(name, args.original, args.timeout)
        row = {"name": name, "original": args.original, "date": str(datetime.date.today())}
        row |= result
        row["known"] = known_failure(name, result) if not result["ok"] else None
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        status = "ok" if result["ok"] else f"{result['error']}: {result['first_line'][:150]}"
        print(f"{result['seconds']:7.1f} s  {name}: {status}", flush=True)
    print(summary(args.out))


if __name__ == "__main__":
    main()
