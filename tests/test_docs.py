"""Every doc the code, configs and README cite exists in the repository, and so does the section.

A citation is a path ``docs/NAME.md``, optionally followed by a section: ``§5`` (a heading
``### 5. …``), ``§1–§7`` (each of them), or a quoted heading name (``"The generation loop"``;
backticks and case are ignored). A bare ``DESIGN.md`` outside ``docs/`` is a dangling citation: it
names a file that is not next to the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "node_modules", "runs", "out", "build", "dist"}
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg"}
CITATION = re.compile(r"docs/(?P<file>[A-Za-z_]+\.md)"
                      r"(?:,?\s+(?:§(?P<first>\d+)(?:\s*[–-]\s*§?(?P<last>\d+))?|\"(?P<name>[^\"\n]+)\"))?")
BARE = re.compile(r"(?<![/\w.])(?P<file>(?:DESIGN|DOCUMENTS|SHAPESTORIES|CORPORA|RESULTS)\.md)\b")
MD_LINK = re.compile(r"\]\((?P<target>[^)#\s]+\.md)(?:#[^)]*)?\)")


def source_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
            continue
        if path.is_file() and path.suffix in SUFFIXES and path != Path(__file__).resolve():
            files.append(path)  # not this file: its examples dangle on purpose
    return sorted(files)


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")]


def _plain(text: str) -> str:
    return text.replace("`", "").casefold().strip()


def problems_in(text: str, where: str, *, in_docs: bool = False) -> list[str]:
    """Every citation of ``text`` that does not resolve, as ``where: what``."""
    out = []
    for m in CITATION.finditer(text):
        doc = ROOT / "docs" / m["file"]
        cited = m[0].strip()
        if not doc.is_file():
            out.append(f"{where}: {cited}: no such file")
            continue
        titles = headings(doc)
        if m["first"]:
            last = int(m["last"] or m["first"])
            for n in range(int(m["first"]), last + 1):
                if not any(re.match(rf"{n}\.\s", t) for t in titles):
                    out.append(f"{where}: {cited}: {doc.name} has no section {n}")
        elif m["name"] and not any(_plain(m["name"]) in _plain(t) for t in titles):
            out.append(f"{where}: {cited}: {doc.name} has no heading {m['name']!r}")
    if not in_docs:
        for m in BARE.finditer(text):
            out.append(f"{where}: {m['file']} without docs/: the file is docs/{m['file']}")
    return out


def test_every_cited_doc_and_section_exists():
    problems = []
    for path in source_files():
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8", errors="replace")
        in_docs = rel.parts[0] == "docs"
        for lineno, line in enumerate(text.splitlines(), 1):
            problems += problems_in(line, f"{rel}:{lineno}", in_docs=in_docs)
    assert not problems, "dangling doc citations:\n" + "\n".join(problems)


def test_the_code_does_cite_the_docs():
    """The check above must have something to check: the design is cited by section."""
    cited = set()
    for path in source_files():
        for m in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            cited.add((m["file"], m["first"] or m["name"]))
    assert {f for f, _ in cited} >= {"DESIGN.md", "DOCUMENTS.md", "SHAPESTORIES.md"}
    assert sum(1 for f, s in cited if f == "DESIGN.md" and s) >= 5


def test_links_inside_docs_resolve():
    problems = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for m in MD_LINK.finditer(doc.read_text(encoding="utf-8")):
            if "://" not in m["target"] and not (doc.parent / m["target"]).is_file():
                problems.append(f"{doc.name}: link to {m['target']}")
    assert not problems, problems


def test_readme_links_the_docs():
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("text,expected", [
    ("see docs/DESIGN.md §5", None),
    ("see docs/DESIGN.md §1–§7", None),
    ('see docs/DESIGN.md "The generation loop"', None),
    ('(docs/DOCUMENTS.md, "What `mmgen generate` writes")', None),
    ("see docs/NOPE.md", "no such file"),
    ("see docs/DESIGN.md §42", "has no section 42"),
    ("see docs/DESIGN.md §7–§9", "has no section 9"),
    ('see docs/DESIGN.md "Training facts"', "has no heading 'Training facts'"),
    ("see DESIGN.md §5", "without docs/"),
])
def test_checker_catches_dangling_citations(text, expected):
    found = problems_in(text, "x")
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
