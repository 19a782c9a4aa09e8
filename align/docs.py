"""Keep README.md's generated sections true.

``python -m align.docs`` rewrites the text between ``<!-- config-reference -->`` and
``<!-- /config-reference -->`` from the config dataclasses (a test fails when the README and the
code disagree). ``python -m align.docs --quickstart DIR`` puts the report of the quickstart run in
DIR into the README (and its plot into docs/); ``--methods FILE``, ``--methods-ppo FILE`` and
``--bench FILE`` paste the Markdown tables written by the benchmark scripts."""
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
        raise ValueError(f"README has no <!-- {tag} --> ... <!-- /{tag} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def quickstart_report(run_dir: Path) -> str:
    """report.md of a quickstart run without its title and plot lines, plus the total wall time."""
    import json
    report = json.loads((run_dir / "report.json").read_text())
    body = [ln for ln in (run_dir / "report.md").read_text().splitlines()[1:] if not ln.startswith("![")]
    total = sum(report["seconds_per_stage"].values())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip().replace("## Samples", "#### Samples")
    return text + f"\n\nPipeline wall time (the stages above): {total / 60:.1f} min.\n"


def main(argv: list[str] | None = None) -> None:
    import argparse
    import shutil
    ap = argparse.ArgumentParser(prog="python -m align.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--quickstart", help="a quickstart run dir whose report goes into the README")
    ap.add_argument("--methods", help="benchmarks/results/methods.md")
    ap.add_argument("--methods-ppo", help="benchmarks/results/methods_ppo_lr.md")
    ap.add_argument("--bench", help="a Markdown summary of the benchmark tables")
    args = ap.parse_args(argv)
    p = Path(args.readme)
    text = replace_section(p.read_text(), "config-reference", config_reference())
    if args.quickstart:
        run = Path(args.quickstart)
        text = replace_section(text, "quickstart-report", quickstart_report(run))
        (p.parent / "docs").mkdir(exist_ok=True)
        shutil.copy(run / "ppo_curves.png", p.parent / "docs" / "quickstart_ppo_curves.png")
    if args.methods:
        text = replace_section(text, "methods-table", Path(args.methods).read_text())
    if args.methods_ppo:
        text = replace_section(text, "methods-ppo-table", Path(args.methods_ppo).read_text())
    if args.bench:
        text = replace_section(text, "bench-summary", Path(args.bench).read_text())
    p.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
