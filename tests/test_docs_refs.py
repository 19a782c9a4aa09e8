"""Citations of the repository's notes cannot dangle.

Code, tests and READMEs cite ``docs/<name>.md #N`` (docs/invariants.md) or ``docs/<name>.md §ID``
(docs/ppo-notes.md), several ids at once as ``docs/ppo-notes.md §D4, §E1 and §E3``. Every cited
file must exist and every cited id must be a section of it: a section is an HTML anchor
``<a id="ID"></a>`` followed by a heading that shows the same id (``## 3. ...`` or ``### §B5 ...``).
The docs' own links (``[text](invariants.md#9)``), the code paths and test names the docs give are
checked too, and nothing may cite the notes' old homes outside the repository.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCANNED = ("align", "data_tools", "tests", "benchmarks", "launch", "configs", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".ini"}

# docs/<name>.md followed by ids: "#3", "§D3", "§1.D", separated by spaces, commas or "and"
CITATION = re.compile(r"docs/([\w-]+\.md)((?:(?:\s*,\s*|\s+and\s+|\s*)(?:§[\w.]*\w|#[\w.]*\w))*)")
CITED_ID = re.compile(r"§([\w.]*\w)|#([\w.]*\w)")
ANCHOR = re.compile(r'^<a id="([^"]+)"></a>\s*$')
DOC_LINK = re.compile(r"\]\(([\w-]+\.md)(?:#([^)\s]+))?\)")
# the notes used to live outside the repository; these names must not come back
STALE = re.compile("DESIGN" + r"\.md|DESIGN invariant|ppo-" + "details")


def scanned_files() -> list[Path]:
    files = [REPO / "README.md", *REPO.glob("*.toml")]
    for top in SCANNED:
        files += [p for p in (REPO / top).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and not _generated(p.relative_to(REPO))]
    return [p for p in files if p.exists() and p.resolve() != Path(__file__).resolve()]


def _generated(rel: Path) -> bool:
    """Virtual environments and work dirs the benchmarks create inside the repository (ignored by
    git): installed packages cite their own docs, not ours."""
    return any(part.startswith(".venv") or part in (".work", "site-packages", "__pycache__") for part in rel.parts)


def sections(doc: Path) -> set[str]:
    """The ids of ``doc``'s sections; an anchor whose heading does not show its id is an error."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    ids = set()
    for i, line in enumerate(lines):
        m = ANCHOR.match(line)
        if not m:
            continue
        sid = m.group(1)
        heading = next((x for x in lines[i + 1:] if x.strip()), "")
        assert heading.startswith("#") and (f"§{sid} " in heading or f" {sid}. " in heading), \
            f"{doc.name}: anchor {sid!r} is not followed by a heading showing it: {heading!r}"
        assert sid not in ids, f"{doc.name}: section id {sid!r} defined twice"
        ids.add(sid)
    return ids


def citations() -> list[tuple[str, str, str | None]]:
    """(where, doc file name, id or None) for every citation in the scanned files."""
    out = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(REPO)
        for m in CITATION.finditer(text):
            where = f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
            ids = [a or b for a, b in CITED_ID.findall(m.group(2))]
            out += [(where, m.group(1), i) for i in ids] or [(where, m.group(1), None)]
        if path.parent == DOCS and path.suffix == ".md":
            for m in DOC_LINK.finditer(text):
                out.append((f"{rel}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1), m.group(2)))
    return out


def test_docs_define_numbered_sections():
    assert sections(DOCS / "invariants.md") >= {str(n) for n in range(1, 12)}
    assert sections(DOCS / "ppo-notes.md") >= {"1", "1.B", "1.D", "A1", "B5", "D3", "F4", "6.7"}


def test_every_citation_points_at_an_existing_section():
    found = citations()
    assert any(doc == "invariants.md" for _, doc, _ in found) and any(doc == "ppo-notes.md" for _, doc, _ in found)
    known = {}
    bad = []
    for where, doc, sid in found:
        if not (DOCS / doc).is_file():
            bad.append(f"{where}: docs/{doc} does not exist")
            continue
        if doc not in known:
            known[doc] = sections(DOCS / doc)
        if sid is not None and sid not in known[doc]:
            bad.append(f"{where}: docs/{doc} has no section {sid!r} (it has {sorted(known[doc])})")
    assert not bad, "\n".join(bad)


def test_the_citation_pattern_reads_every_form():
    text = ("see docs/ppo-notes.md §1.D, §D4 and §E1. Also docs/invariants.md #1 and #2; "
            "(docs/invariants.md) and docs/ppo-notes.md §6.7). A link: docs/ppo-notes.md#B5.")
    got = [(m.group(1), [a or b for a, b in CITED_ID.findall(m.group(2))]) for m in CITATION.finditer(text)]
    assert got == [("ppo-notes.md", ["1.D", "D4", "E1"]), ("invariants.md", ["1", "2"]),
                   ("invariants.md", []), ("ppo-notes.md", ["6.7"]), ("ppo-notes.md", ["B5"])]


def test_paths_and_tests_named_in_the_docs_exist():
    """Every `align/...`, `data_tools/...` or `tests/...` path in backticks exists, and every
    `tests/x.py::name` (and a following `::name`, meaning the same file) is a test in that file."""
    bad = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        current = None
        for m in re.finditer(r"`((?:align|data_tools|tests)/[\w/.-]+)(?:::(\w+))?`|`::(\w+)`", text):
            path, name = (m.group(1), m.group(2)) if m.group(1) else (current, m.group(3))
            if m.group(1):
                if not (REPO / path).exists():
                    bad.append(f"{doc.name}: {path} does not exist")
                    continue
                current = path if path.endswith(".py") else current
            if name is not None:
                if path is None or not re.search(rf"^def {name}\(", (REPO / path).read_text(encoding="utf-8"), re.M):
                    bad.append(f"{doc.name}: no test {path}::{name}")
    assert not bad, "\n".join(bad)


def test_nothing_cites_the_notes_old_homes():
    bad = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
           for p in scanned_files() if p.parent != DOCS
           for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if STALE.search(line)]
    assert not bad, "cite docs/invariants.md or docs/ppo-notes.md instead:\n" + "\n".join(bad)
