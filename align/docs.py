"""Keep the generated sections of the docs true.

``python -m align.docs`` rewrites the text between ``<!-- config-reference -->`` and
``<!-- /config-reference -->`` in docs/configuration.md from the config dataclasses (a test fails
when the page and the code disagree). The other generated sections live on the page that documents
their material, each between ``<!-- TAG -->`` and ``<!-- /TAG -->``:

=========================  ====================  =======================  =====================================
option                     page                  TAG                      input
=========================  ====================  =======================  =====================================
(always)                   docs/configuration.md config-reference         the config dataclasses
``--quickstart DIR``       docs/quickstart.md    quickstart-report        a quickstart run dir (its
                                                                          ppo_curves.png goes to
                                                                          docs/quickstart_ppo_curves.png)
``--methods FILE``         docs/adapters.md      methods-table            benchmarks/results/methods.md
``--methods-ppo FILE``     docs/adapters.md      methods-ppo-table        benchmarks/results/methods_ppo_lr.md
``--methods-smollm2 FILE`` docs/adapters.md      methods-smollm2-table    benchmarks/results/methods_smollm2.md
``--bench FILE``           docs/results.md       bench-summary            a Markdown summary of the benchmark
                                                                          tables
=========================  ====================  =======================  =====================================

A results file's YAML front matter (its run history: date, commit, machine load) is not pasted: it
stays in the file under benchmarks/results/, which the page links to. ``--root`` is the repository
root (default: the current directory)."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from align.config import reference_markdown
from align.registry import STAGES

CONFIGS = [(name, stage.module, stage.config_name) for name, stage in STAGES.items()]


def config_reference() -> str:
    parts = []
    for name, module, cls in CONFIGS:
        table = reference_markdown(getattr(importlib.import_module(module), cls))
        if name != "sft":  # adapter.* is the same everywhere: listed once, under sft
            table = "\n".join(ln for ln in table.splitlines() if not ln.startswith("| `adapter.")) + "\n"
        parts.append(f"<details><summary><code>align {name}</code></summary>\n\n{table}\n</details>\n")
    return "\n".join(parts)


def replace_section(text: str, tag: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {tag} -->\n).*?(<!-- /{tag} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"the page has no <!-- {tag} --> ... <!-- /{tag} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def quickstart_report(run_dir: Path) -> str:
    """report.md of a quickstart run without its title and plot lines, plus the total wall time."""
    import json
    report = json.loads((run_dir / "report.json").read_text())
    body = [ln for ln in (run_dir / "report.md").read_text().splitlines()[1:] if not ln.startswith("![")]
    total = sum(report["seconds_per_stage"].values())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip().replace("## Samples", "#### Samples")
    return text + f"\n\nPipeline wall time (the stages above): {total / 60:.1f} min.\n"


PAGES = {"config-reference": "docs/configuration.md", "quickstart-report": "docs/quickstart.md",
         "methods-table": "docs/adapters.md", "methods-ppo-table": "docs/adapters.md",
         "methods-smollm2-table": "docs/adapters.md", "bench-summary": "docs/results.md"}


def without_front_matter(text: str) -> str:
    """``text`` without a leading YAML front matter block (``---`` ... ``---``)."""
    m = re.match(r"---\n.*?\n---\n", text, re.S)
    return text[m.end():] if m else text


def main(argv: list[str] | None = None) -> None:
    import argparse
    import shutil
    ap = argparse.ArgumentParser(prog="python -m align.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository root")
    ap.add_argument("--quickstart", help="a quickstart run dir whose report goes into docs/quickstart.md")
    ap.add_argument("--methods", help="benchmarks/results/methods.md")
    ap.add_argument("--methods-ppo", help="benchmarks/results/methods_ppo_lr.md")
    ap.add_argument("--methods-smollm2", help="benchmarks/results/methods_smollm2.md")
    ap.add_argument("--bench", help="a Markdown summary of the benchmark tables")
    args = ap.parse_args(argv)
    root = Path(args.root)
    bodies = {"config-reference": config_reference()}
    if args.quickstart:
        run = Path(args.quickstart)
        bodies["quickstart-report"] = quickstart_report(run)
        (root / "docs").mkdir(exist_ok=True)
        shutil.copy(run / "ppo_curves.png", root / "docs" / "quickstart_ppo_curves.png")
    for tag, src in (("methods-table", args.methods), ("methods-ppo-table", args.methods_ppo),
                     ("methods-smollm2-table", args.methods_smollm2), ("bench-summary", args.bench)):
        if src:
            bodies[tag] = without_front_matter(Path(src).read_text())
    for page in dict.fromkeys(PAGES.values()):
        tags = [tag for tag in bodies if PAGES[tag] == page]
        if tags:
            p = root / page
            text = p.read_text()
            for tag in tags:
                text = replace_section(text, tag, bodies[tag])
            p.write_text(text)

if __name__ == "__main__":
    main(sys.argv[1:])
