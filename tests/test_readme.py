"""The README stays a short, true front door and the docs stay true.

The config reference in docs/configuration.md is the one generated from the config dataclasses; the
README fits its line budget, names only real commands and launch scripts; every relative link in the
README and docs/ resolves; and neither names dates, issue numbers or commits (run history belongs in
the YAML front matter of benchmarks/results/*.md)."""
from __future__ import annotations

import re
from pathlib import Path

from align.docs import config_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIG_PAGE = REPO / "docs" / "configuration.md"
README_MAX_LINES = 320


def pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def test_config_reference_matches_the_code():
    text = CONFIG_PAGE.read_text()
    section = re.search(r"<!-- config-reference -->\n(.*?)<!-- /config-reference -->", text, re.S).group(1)
    assert section == config_reference(), "docs/configuration.md is stale: run `python -m align.docs`"


def test_the_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_every_relative_link_resolves():
    """``[text](path)`` and ``![alt](path)`` in the README and docs/*.md name existing files
    (anchors are not checked; docs/invariants.md and ppo-notes.md ids: tests/test_docs_refs.py)."""
    bad = []
    for page in pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                path = target.split("#", 1)[0]
                if not (page.parent / path).exists():
                    bad.append(f"{page.relative_to(REPO)}:{n}: {target}")
    assert not bad, "\n".join(bad)


def test_the_readme_names_only_real_commands_and_scripts():
    import contextlib
    import io

    from align.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--help"])
    real = set(re.findall(r"^    (\w+)\s", out.getvalue(), re.M))   # `align --help` lists one per line
    assert {"sft", "reward", "ppo", "dpo", "grpo", "rloo", "eval", "pipeline", "config", "import"} <= real
    text = README.read_text()
    code = re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text)
    named = {m for block in code for m in re.findall(r"(?:^|[\s`])align (\w+)", block, re.M)}
    assert named, "the README names no align command"
    assert named <= real, f"not align commands: {sorted(named - real)} (real: {sorted(real)})"
    for page in pages():
        for script in set(re.findall(r"launch/[\w-]+\.sh", page.read_text())):
            assert (REPO / script).is_file(), f"{page.name} names {script}, which does not exist"


DATED = [(re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date"),
         (re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
         (re.compile(r"\bcommits? [0-9a-f]{7,40}\b"), "a commit hash")]


def test_no_dates_issue_numbers_or_commits_in_the_docs():
    """User docs say how a number was measured and link the results file; when, on which commit and
    under which issue are run history, kept in the front matter of benchmarks/results/*.md."""
    bad = [f"{page.relative_to(REPO)}:{n}: {what}: {line.strip()[:120]}"
           for page in pages()
           for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
           for pattern, what in DATED if pattern.search(line)]
    assert not bad, "\n".join(bad)


def test_every_config_key_has_a_meaning():
    missing = [ln for ln in config_reference().splitlines() if ln.startswith("| `") and ln.endswith("|  |")]
    assert not missing, missing


def test_every_results_file_front_matter_is_a_yaml_mapping():
    """The run history at the top of benchmarks/results/*.md is YAML a script can read (a value with
    ': ' in it must be quoted), including what benchmarks/common.py's front_matter writes."""
    import sys

    import yaml
    sys.path.insert(0, str(REPO))
    from benchmarks.common import front_matter
    bad = []
    files = sorted((REPO / "benchmarks" / "results").rglob("*.md"))
    written = front_matter({"date": "2026-01-01", "machine": "x86_64, 2 CPU cores: no GPU",
                            "load_average": {"start": [0.5, 1.0, 1.5], "end": [1.0, 1.0, 1.0]}})
    texts = [(f.relative_to(REPO), f.read_text(encoding="utf-8")) for f in files] + [("front_matter()", written)]
    for name, text in texts:
        if not text.startswith("---\n"):
            continue
        try:
            data = yaml.safe_load(text.split("---\n", 2)[1])
            if not isinstance(data, dict):
                bad.append(f"{name}: front matter is not a mapping")
        except yaml.YAMLError as e:
            bad.append(f"{name}: {str(e).splitlines()[0]}")
    assert len(files) > 20 and not bad, "\n".join(bad)
    assert yaml.safe_load(written.split("---\n", 2)[1])["load_average_1_5_15_min"]["start"] == [0.5, 1.0, 1.5]
