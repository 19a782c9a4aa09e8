"""Keep README.md's generated sections true: ``python -m align.docs [README.md]`` rewrites the text
between ``<!-- config-reference -->`` and ``<!-- /config-reference -->`` from the config
dataclasses (a test fails when the README and the code disagree)."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from align.config import reference_markdown

CONFIGS = [("sft", "align.stages.sft", "SFTConfig"), ("reward", "align.stages.reward", "RewardConfig"),
           ("ppo", "align.stages.ppo", "PPOConfig"), ("eval", "align.evaluate", "EvalConfig"),
           ("pipeline", "align.pipeline", "PipelineConfig")]


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


def main(path: str = "README.md") -> None:
    p = Path(path)
    p.write_text(replace_section(p.read_text(), "config-reference", config_reference()))


if __name__ == "__main__":
    main(*sys.argv[1:])
