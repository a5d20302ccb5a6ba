"""Sweep every transformers model type: build small, run, convert with the run-time audit.

Each type runs in a child process (forked after torch and transformers are imported, so a child
costs only its own modeling module) under a timeout and a memory watch: a type that hangs or eats
memory is recorded as such and the sweep goes on. One JSON line per type goes to
``tests/zoo/hf_all.jsonl`` (``--out``); a rerun skips the types already there (``--redo`` runs
them again), so the sweep can be stopped and resumed. Run it niced::

    nice -n 10 python benchmarks/hf_zoo_sweep.py [TYPE ...] [--jobs 2]

Statuses: ``full`` (converts, the audit ran and finds nothing left), ``partial`` (the audit lists
sites left, with the module they ran in), ``unreported`` (an activation function still runs that
the report names neither as kept nor as left: a silent partial conversion), ``nothing`` (no
activation to convert), ``too-large`` (over 5M parameters or a 10 s forward on one thread),
``no-build`` / ``no-run`` / ``convert-error`` / ``audit-error`` (reason: the exception's first
line), ``timeout``, ``memory``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
import transformers.generation
import transformers.modeling_utils
import transformers.models.auto.modeling_auto

import serfswap
from tests.support.probes import count_activation_calls
from tests.zoo import hf_all
from tests.zoo.check import prepare, tensors

TIMEOUT_S = 90.0
MEMORY_BYTES = 4 << 30


def first_line(exc: BaseException) -> str:
    """The exception's first line, and its cause's (config validators wrap the real error)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}"
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        line += f" ({first_line(exc.__cause__)})"
    return line[:300]


def trace() -> str:
    """Where the exception being handled was raised: ``file.py:line in function`` of its last
    frame outside torch (the model's or transformers' line that broke)."""
    frames = traceback.extract_tb(sys.exc_info()[2])
    outside = [f for f in frames if "/torch/" not in f.filename] or frames
    last = outside[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def has_audit() -> bool:
    return "example_inputs" in inspect.signature(serfswap.convert).parameters


def site_row(site: Any) -> dict[str, str]:
    return {"name": site.name, "kind": site.kind, "source": site.source, "where": site.where}


def audit(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Convert every default family and classify by the report's run-time audit; also count,
    independently, the torch activation calls a forward of the converted model still makes
    (positivity constraints kept by design are among them)."""
    kwargs: dict[str, Any] = {"activations": "all"}
    if has_audit():
        kwargs.update(example_inputs=batch, audit=True)
    try:
        converted = serfswap.convert(model, **kwargs)
    except serfswap.NothingToConvertError as exc:
        return {"status": "nothing", "reason": first_line(exc)}
    report = converted.serfswap_report
    with torch.no_grad(), count_activation_calls() as calls:
        tensors(converted(**batch))
    row: dict[str, Any] = {
        "converted": len(report.converted),
        "kept": [site_row(s) for s in report.skipped],
        "probe": dict(calls.seen),
    }
    if not has_audit():
        row["status"] = "unaudited"
        return row
    if not report.audited:
        return {**row, "status": "audit-error", "reason": report.audit_error}
    row["left"] = [site_row(s) for s in report.left]
    row["status"] = "partial" if report.left else "full"
    named = {s.family for s in report.skipped} | {s.family for s in report.left}
    if set(calls.seen) - named:  # calls the report accounts for neither as kept nor as left
        row["status"] = "unreported"
    return row


def measure(model_type: str) -> dict[str, Any]:
    """One type, start to end (runs in the child)."""
    torch.set_num_threads(1)
    row: dict[str, Any] = {"type": model_type, "transformers": transformers.__version__}
    start = time.perf_counter()
    try:
        params = hf_all.params_on_meta(model_type)
    except Exception:  # the real build below says why, or builds where meta cannot
        params = 0
    if params > hf_all.MAX_PARAMS:
        return {**row, "status": "too-large", "params": params, "reason": f"{params:,} parameters"}
    try:
        model = hf_all.build(model_type)
    except Exception as exc:
        return {**row, "status": "no-build", "reason": first_line(exc), "at": trace()}
    row["class"] = type(model).__name__
    row["params"] = sum(p.numel() for p in model.parameters())
    row["build_s"] = round(time.perf_counter() - start, 2)
    if row["params"] > hf_all.MAX_PARAMS:
        return {**row, "status": "too-large", "reason": f"{row['params']:,} parameters"}
    try:
        prepare(model)
        batch = hf_all.runnable_inputs(model)
        row["inputs"] = sorted(batch)
        start = time.perf_counter()
        with torch.no_grad():
            outs = tensors(model(**batch))
        row["forward_s"] = round(time.perf_counter() - start, 3)
        if not outs:
            raise ValueError("the output holds no floating-point tensor")
    except Exception as exc:
        return {**row, "status": "no-run", "reason": first_line(exc), "at": trace()}
    if row["forward_s"] > hf_all.MAX_FORWARD_S:
        return {**row, "status": "too-large", "reason": f"forward {row['forward_s']} s"}
    start = time.perf_counter()
    try:
        row.update(audit(model, batch))
    except Exception as exc:
        row.update(status="convert-error", reason=first_line(exc))
        row["at"] = trace()
    row["convert_s"] = round(time.perf_counter() - start, 2)
    return row


def _child(model_type: str, conn: Any) -> None:
    try:
        row = measure(model_type)
        row["cpu_s"] = round(time.process_time(), 2)  # the child's CPU: the load of others aside
        conn.send(row)
    except BaseException as exc:  # the parent must hear back whatever happens
        conn.send({"type": model_type, "status": "no-build", "reason": first_line(exc)})
    conn.close()


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_one(model_type: str) -> dict[str, Any]:
    """``measure`` in a forked child, killed at the timeout or the memory limit."""
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, there), daemon=True)
    start = time.monotonic()
    proc.start()
    there.close()
    row: dict[str, Any] | None = None
    while row is None:
        if here.poll(0.2):
            try:
                row = here.recv()
            except EOFError:
                row = {"type": model_type, "status": "no-build",
                       "reason": f"the child died (exit code {proc.exitcode})"}  # fmt: skip
        elif time.monotonic() - start > TIMEOUT_S:
            row = {"type": model_type, "status": "timeout", "reason": f"over {TIMEOUT_S:.0f} s"}
        elif rss(proc.pid) > MEMORY_BYTES:
            row = {"type": model_type, "status": "memory", "reason": "over 4 GiB"}
        elif not proc.is_alive() and not here.poll(0):
            row = {"type": model_type, "status": "no-build",
                   "reason": f"the child died (exit code {proc.exitcode})"}  # fmt: skip
    if proc.is_alive():
        proc.kill()
    proc.join()
    row["wall_s"] = round(time.monotonic() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every one)")
    parser.add_argument("--out", type=Path, default=hf_all.RESULTS_PATH)
    parser.add_argument("--redo", action="store_true", help="run types already recorded again")
    parser.add_argument("--jobs", type=int, default=1, help="types run at once")
    args = parser.parse_args()
    todo = args.types or hf_all.types()
    done = set() if args.redo else set(hf_all.results() if args.out == hf_all.RESULTS_PATH else {})
    if args.out.exists() and args.out != hf_all.RESULTS_PATH and not args.redo:
        done = {json.loads(x)["type"] for x in args.out.read_text().splitlines() if x.strip()}
    todo = [t for t in todo if t not in done]
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    print(f"{len(todo)} types to run; {versions}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool, args.out.open("a") as out:
        for i, row in enumerate(pool.map(run_one, todo)):
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"[{i + 1}/{len(todo)}] {row['type']}: {row['status']} "
                  f"{row.get('reason', '')}", flush=True)  # fmt: skip
    compact(args.out)


def compact(path: Path) -> None:
    """Keep one line per type, the last one written, in type order (a resumed or redone sweep
    appends)."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["type"]] = row
    path.write_text("".join(json.dumps(rows[t]) + "\n" for t in sorted(rows)))


if __name__ == "__main__":
    main()
