"""The documentation's generated tables: the activation table (from
serfswap.rewrite.activations), the model families tested (from the zoo tests' parametrization)
and the benchmark tables (copied from benchmarks/RESULTS.md with their commands). Each lives in
a page under docs/, between ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers (PAGES says
which page holds which); ``test_package`` fails when a page differs from what this renders.
(The module kept its name from when the tables were in the README.) Rewrite them with:

    python -m tests.readme_tables --write
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from serfswap.rewrite import activations as acts
from serfswap.rewrite import positivity

from .zoo import hf_all, hf_zoo, timm_zoo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def activation_table() -> str:
    rows: dict[str, list[str]] = defaultdict(list)
    for cls, family in acts._TORCH_CLASSES.items():
        rows[family].append(f"`nn.{cls.__name__}`")
    for module, names in acts._LIBRARY_CLASSES.items():
        lib = module.split(".")[0]
        for name, family in names.items():
            rows[family].append(f"`{name}` ({lib})")
    functions: dict[str, list[str]] = defaultdict(list)
    for fn, info in acts.TORCH_FUNCTIONS.items():
        module = (
            "Tensor"
            if "Tensor" in getattr(fn, "__qualname__", "")
            else ("F" if fn.__module__ in ("torch.nn.functional", "torch._C._nn") else "torch")
        )
        name = fn.__name__
        functions[info.family].append(
            f"`{module}.{name}`" if module != "Tensor" else f"`x.{name}()`"
        )
    order = [*sorted(acts.DEFAULT_FAMILIES), *sorted(acts.OPTIONAL_FAMILIES), acts.GATE]
    lines = [
        "| family | replaced | modules | functions |",
        "|---|---|---|---|",
    ]
    for family in order:
        if family in acts.DEFAULT_FAMILIES:
            when = "by default"
        elif family == acts.GATE:
            when = "never"
        else:
            when = f"when asked (`activations=['{family}']` or `'all'`)"
        mods = ", ".join(rows.get(family, [])) or "-"
        fns = ", ".join(sorted(set(functions.get(family, [])))) or "-"
        lines.append(f"| {family} | {when} | {mods} | {fns} |")
    known = ", ".join(
        f"`{cls}.{attr}` ({module.split('.')[0]})"
        for module, classes in positivity.KNOWN.items()
        for cls, attrs in classes.items()
        for attr in attrs
    )
    lines.append(
        f"| role: {positivity.ROLE} | only when named (`include=` naming the site, or "
        f"`activations=[..., '{positivity.ROLE}']`) | any of the above whose output must stay "
        f"non-negative: {known}, and what the rules `query-key` / `denominator` find | same |"
    )
    return "\n".join(lines)


def sweep_sentence() -> str:
    """What the committed per-family sweep measured: the page claims no more than its rows."""
    families = set(timm_zoo.FAMILIES.values())
    rows = {n: r for n, r in timm_zoo.sweep_results().items() if n in families}
    if not rows:
        return "The other families' models are not exported in CI, and were not swept by hand."
    ok = sorted(n for n, r in rows.items() if r["ok"])
    failed = sorted(n for n, r in rows.items() if not r["ok"])
    dates = sorted({r["date"] for r in rows.values()})
    minutes = sum(r["seconds"] for r in rows.values()) / 60
    text = (
        "The families' models are exported the same way by hand (too slow for CI) with `python "
        "benchmarks/zoo_export_sweep.py` (one niced subprocess per model, one torch thread; "
        f"{' to '.join(dates[:: max(1, len(dates) - 1)])}, {minutes:.0f} min on 2 shared "
        f"cores): {len(rows)} of the {len(families)} swept, {len(ok)} exported and verified, "
        f"{len(failed)} failed" + (", each in the table below" if failed else "")
    )
    if len(rows) < len(families):
        text += "; not swept: " + ", ".join(
            f"`{n}`" for n in timm_zoo.FAMILIES.values() if n not in rows
        )
    return text + " (each model's line: `benchmarks/zoo_export_sweep.jsonl`)."


def failure_lines() -> list[str]:
    """The timm models whose export fails (none, or a table), and those the dynamo exporter
    fails on that the TorchScript fallback exports (from the sweep's rows)."""
    lines = []
    if timm_zoo.EXPORT_FAILURES:
        lines += [
            "Known failures; each one's original (unconverted) model fails the same way:",
            "",
            "| model | why its export fails |",
            "|---|---|",
            *(f"| `{name}` | {why} |" for name, (_, why) in timm_zoo.EXPORT_FAILURES.items()),
        ]
    else:
        lines.append("Known failures: none.")
    fallback = {n: r for n, r in timm_zoo.sweep_results().items()
                if r["ok"] and r.get("exporter") == "torchscript"}  # fmt: skip
    if fallback:
        prefix = "the dynamo exporter failed: "
        why = {n: r["why"].removeprefix(prefix) for n, r in fallback.items()}
        lines += [
            "",
            "Exported by the TorchScript exporter, where torch's dynamo exporter fails (the "
            "original models fail there the same way):",
            "",
            "| model | why the dynamo exporter fails |",
            "|---|---|",
            *(f"| `{n}` | {text[:160]} |" for n, text in why.items()),
        ]
    return lines


def zoo_table() -> str:
    lines = [
        f"timm: all {len(timm_zoo.TEST_MODELS)} `test_*` architectures, and "
        f"{len(timm_zoo.FAMILIES)} families, one model each:",
        "",
        ", ".join(f"{family} (`{name}`)" for family, name in timm_zoo.FAMILIES.items()),
        "",
        "timm families not in the zoo, too large for CI's 2 CPU cores: "
        + "; ".join(f"{family} ({why})" for family, why in timm_zoo.LEFT_OUT.items())
        + ".",
        "",
        "ONNX export (slow job, `test_timm_export`): the "
        f"{len(timm_zoo.TEST_MODELS)} `test_*` architectures and {len(timm_zoo.EXPORTED_IN_CI)} "
        "families' models ("
        + ", ".join(f"`{name}`" for name in timm_zoo.EXPORTED_IN_CI)
        + '), converted with the defaults for every family (`activations="all"`, positivity '
        "constraints kept), are exported (batch 2) with `export_onnx`'s defaults and verified "
        "against torch at 1e-4 of each output's magnitude (fresh inputs of batch 3). "
        + sweep_sentence(),
        "",
        *failure_lines(),
        "",
        f"transformers: {len(hf_zoo.MODELS)} model types, built from a shrunk config:",
        "",
        ", ".join(f"`{t}`" for t in hf_zoo.MODELS),
        "",
        "Each transformers type is also exported to ONNX with a dynamic batch and sequence and "
        "verified with onnxruntime"
        + (
            ", except "
            if hf_zoo.EXPORT_FAILS
            else " (`mixtral` with its experts computed as `batched_mm`, see "
            "[Exporting to ONNX](export.md))"
        )
        + "; ".join(f"`{t}` ({why})" for t, why in hf_zoo.EXPORT_FAILS.items())
        + ". Exported with a dynamic batch and a static sequence, because their dynamic "
        "export breaks (`tests/export/test_export_fallback.py`): "
        + ", ".join(f"`{t}`" for t in hf_zoo.SHAPE_FALLBACK)
        + ".",
    ]
    return "\n".join(lines)


STATUS_TITLES = {
    "too-large": "too large for CI (over 5M parameters or a 10 s forward)",
    "no-build": "does not build from a generically shrunk config",
    "no-run": "builds, but does not run on the inferred inputs",
    "convert-error": "convert raised",
    "audit-error": "the audit's forward failed",
    "timeout": "timed out",
    "memory": "over the memory limit",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:160]


def _left(row: dict) -> str:
    return "; ".join(f"`{s['source']}` in `{s['name'] or '(root)'}`" + (f" [{s['where']}]" if
                     s.get("where") else "") for s in row.get("left", []))  # fmt: skip


def hf_zoo_table() -> str:
    """The sweep over every transformers type (tests/zoo/hf_all.jsonl), by outcome."""
    rows = hf_all.results()
    if not rows:
        raise SystemExit("tests/zoo/hf_all.jsonl is missing: run benchmarks/hf_zoo_sweep.py")
    by: dict[str, list[str]] = defaultdict(list)
    for t, row in sorted(rows.items()):
        by[row["status"]].append(t)
    tested = set(hf_all.tested(rows))
    sweep_only = sorted(t for s in hf_all.TESTED_STATUSES for t in by[s] if t not in tested)
    lines = [
        f"`benchmarks/hf_zoo_sweep.py` ran each of the {len(rows)} types transformers "
        f"{rows[next(iter(rows))].get('transformers', '5')} registers beyond those above: "
        + ", ".join(f"{len(v)} {k}" for k, v in sorted(by.items(), key=lambda kv: -len(kv[1])))
        + ".",
        "",
        f"Converts fully, the audit finding nothing left ({len(by['full'])}): "
        + (", ".join(f"`{t}`" for t in by["full"]) or "none"),
        "",
        *(
            [
                f"Converts partly ({len(by['partial'])}): the report lists each site left at "
                "run time.",
                "",
                "| type | left at run time | why |",
                "|---|---|---|",
                *(f"| `{t}` | {_left(rows[t])} | {hf_all.WHY.get(t, '')} |" for t in by["partial"]),
            ]
            if by["partial"]
            else ["Converts partly: none (the audit finds nothing left in any type that runs)."]
        ),
        "",
        *(
            [
                f"Runs an activation its report names neither as kept nor as left "
                f"({len(by['unreported'])}, a silent partial conversion): "
                + ", ".join(f"`{t}` ({rows[t].get('probe')})" for t in by["unreported"]),
                "",
            ]
            if by["unreported"]
            else []
        ),
        f"Nothing to convert (no activation of a default family; {len(by['nothing'])}):",
        "",
        "| type | what it uses instead |",
        "|---|---|",
        *(f"| `{t}` | {hf_all.WHY.get(t, '')} |" for t in by["nothing"]),
        "",
        f"`tests/test_zoo_hf_all.py` (slow job) converts {len(tested)} of these, the cheapest "
        f"first, within {hf_all.TEST_BUDGET_S:.0f} s of the CPU time the sweep recorded for "
        "them (it asserts each recorded outcome: the same sites left, none unreported, finite "
        "outputs); the sweep alone "
        f"runs the other {len(sweep_only)}: "
        + (", ".join(f"`{t}`" for t in sweep_only) or "none")
        + ".",
        "",
        "<details markdown><summary>Types the sweep could not convert, and why (the exception's "
        "first line, and the line outside torch that raised it)</summary>",
        "",
        "| type | outcome | reason |",
        "|---|---|---|",
    ]
    for status, title in STATUS_TITLES.items():
        lines += [
            f"| `{t}` | {title} | {_cell(rows[t].get('reason', ''))}"
            + (f" (`{rows[t]['at']}`)" if rows[t].get("at") else "")
            + " |"
            for t in by[status]
        ]
    lines += ["", "</details>"]
    return "\n".join(lines)


RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def benchmark_tables() -> str:
    """Every table of benchmarks/RESULTS.md (a fenced block or a markdown table) that follows a
    paragraph opening with a `python benchmarks/...` command, with that command."""
    lines = RESULTS.read_text().splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = re.match(r"^`(python benchmarks/[^`]+)`", lines[i])
        i += 1
        if not match:
            continue
        while i < len(lines) and lines[i].strip():  # the rest of the command's paragraph
            i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i < len(lines) and lines[i].startswith("```"):
            end = lines.index("```", i + 1)
            table = lines[i : end + 1]
        else:
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            table = lines[i:end]
        if table:
            out += [f"`{match.group(1)}`", "", *table, ""]
    if not out:
        raise SystemExit("benchmarks/RESULTS.md has no `python benchmarks/...` tables")
    return "\n".join(out).rstrip()


SECTIONS = {
    "activations": activation_table,
    "zoo": zoo_table,
    "hf-zoo": hf_zoo_table,
    "benchmarks": benchmark_tables,
}
# The page that holds each generated section: one home per table.
PAGES = {
    "activations": DOCS / "converting.md",
    "zoo": DOCS / "models.md",
    "hf-zoo": DOCS / "models.md",
    "benchmarks": DOCS / "benchmarks.md",
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:begin -->\n)(.*?\n)?(<!-- {name}:end -->)", re.DOTALL)


def render(text: str, names: list[str]) -> str:
    """``text`` with the sections ``names`` generated afresh between their markers."""
    for name in names:
        pattern = _pattern(name)
        if len(pattern.findall(text)) != 1:
            raise SystemExit(f"expected one <!-- {name}:begin/end --> pair in {PAGES[name]}")
        make = SECTIONS[name]
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(3), text)
    return text


def rendered() -> dict[Path, tuple[str, str]]:
    """Each page that holds generated sections: (its text, the text it should have)."""
    pages: dict[Path, list[str]] = defaultdict(list)
    for name, page in PAGES.items():
        pages[page].append(name)
    out = {}
    for page, names in pages.items():
        text = page.read_text()
        out[page] = (text, render(text, names))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="render the documentation's generated tables")
    parser.add_argument("--write", action="store_true", help="rewrite the pages in place")
    args = parser.parse_args()
    for page, (text, new) in rendered().items():
        name = page.relative_to(ROOT)
        if new == text:
            print(f"{name} is up to date")
        elif args.write:
            page.write_text(new)
            print(f"{name} rewritten")
        else:
            print(f"{name} is stale")


if __name__ == "__main__":
    main()
