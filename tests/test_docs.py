"""The README's links and the repository paths the pages name. `mkdocs build --strict` (a line
of .ci/run) checks the links between the docs pages, but the README is outside the site, so its
links to files, pages and anchors are checked here, as GitHub resolves them (relative to the
repository root); and a path in a code span (`tests/test_export.py`) must exist, on every page,
because modules and tests move (#25) and a page that names the old place misleads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"`((?:serfswap|tests|benchmarks|examples|scripts|docs|\.ci)/[^`\s]*)`")


def unfenced(text: str) -> str:
    """The text without its fenced blocks (code and commands, not references)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings, slugged as GitHub (and MkDocs' toc) do."""
    headings = re.findall(r"^#+ (.+)$", prose(page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """The links of ``page`` (or of ``text`` read as if it were that page) that lead nowhere."""
    broken = []
    for target in LINK.findall(prose(page.read_text() if text is None else text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(ROOT)}")
    return broken


def missing_paths(text: str) -> list[str]:
    """The repository paths named in the text's code spans that do not exist."""
    return sorted({p for p in PATH.findall(unfenced(text)) if not (ROOT / p).exists()})


def test_readme_links_resolve() -> None:
    assert LINK.findall(prose((ROOT / "README.md").read_text())), "the README links to its docs"
    assert not broken_links(ROOT / "README.md")


@pytest.mark.parametrize(
    ("link", "why"),
    [("[x](docs/nowhere.md)", "no such file"), ("[x](docs/cli.md#nowhere)", "no heading")],
)
def test_a_broken_readme_link_is_caught(link: str, why: str) -> None:
    (found,) = broken_links(ROOT / "README.md", f"# Probe\n\nSee {link}.\n")
    assert why in found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_named_repository_paths_exist(page: Path) -> None:
    assert not missing_paths(page.read_text())


def test_a_missing_path_is_caught() -> None:
    assert missing_paths("see `serfswap/io.py` and `tests/test_docs.py`") == ["serfswap/io.py"]


def test_the_readme_is_short() -> None:
    """The README holds what a newcomer needs first; the reference is docs/ (issue #25)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400
