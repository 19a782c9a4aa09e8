"""The shape of the code: no function in align/, data_tools/ or benchmarks/ longer than a screen, so
each does one named thing; and "sample → cut at the stop → mask → score" lives in one module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
PACKAGES = ("align", "data_tools", "benchmarks")


def _sources(package: str) -> list[Path]:
    """The package's Python files, less those under a dot directory (benchmarks/.venv-trl, .work)."""
    return [path for path in sorted((ROOT / package).rglob("*.py"))
            if not any(part.startswith(".") for part in path.relative_to(ROOT / package).parts)]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for path in _sources(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_only_the_scoring_module_samples_and_cuts_responses():
    """Stages call align.scoring (generate/score/evaluate_role), not the sampler and the stop-token
    cut themselves: one place decides where a response ends and where it is scored."""
    users = []
    for path in sorted((ROOT / "align").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("align/scoring.py", "align/generation.py", "align/rl/rollout.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                random_sample = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    f.value.id in ("rng", "random")  # random.Random.sample: drawing from a list
                if name in ("sample", "truncate_after_stop") and not random_sample:
                    users.append(f"{rel}:{node.lineno} {name}()")
    assert not users, "sampling/cutting outside align/scoring.py:\n" + "\n".join(users)
