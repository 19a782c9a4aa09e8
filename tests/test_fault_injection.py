"""Careless and hostile-but-realistic use: nothing a user had is lost, no non-finite tensor is saved,
every refusal is one clear line.

``align import --out``: an output never replaces what align import did not write or one of its own
inputs; a directory it wrote is replaced only with ``--overwrite``; files get the user's mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools import cli
from data_tools.canonical import read_records
from data_tools.outputs import MARKER

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(6)]


def _input(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def _import(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "align.cli", "import", "jsonl", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stderr


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_output_directory_holding_the_input_is_never_replaced(tmp_path):
    data = tmp_path / "mydata"
    inp = _input(data / "pairs.jsonl")
    (data / "notes.txt").write_text("mine\n")
    before = _tree(data)
    for extra in ([], ["--overwrite"]):
        rc, err = _import(str(inp), "--out", str(data), *extra)
        assert rc == 2 and "would overwrite the input" in err and len(err.strip().splitlines()) == 1, err
        assert _tree(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]      # no .mydata.old.* left behind


def test_out_dot_is_refused_and_changes_nothing(tmp_path):
    inp = _input(tmp_path / "elsewhere" / "pairs.jsonl")
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("keep\n")
    r = subprocess.run([sys.executable, "-m", "align.cli", "import", "jsonl", str(inp), "--out", ".", "--overwrite"],
                       cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "holds files align import did not write" in r.stderr, r.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "work"]


@pytest.mark.parametrize("split", [False, True])
def test_a_directory_align_import_wrote_is_replaced_only_with_overwrite(tmp_path, split):
    inp = _input(tmp_path / "pairs.jsonl")
    out = tmp_path / "ds"
    extra = ["--split", "train=0.5,test=0.5"] if split else []
    assert cli.main(["jsonl", str(inp), "--out", str(out), *extra]) == 0
    assert (out / MARKER).is_file()
    first = _tree(out)
    rc, err = _import(str(inp), "--out", str(out), *extra)
    assert rc == 2 and "holds an earlier import; pass --overwrite" in err
    assert _tree(out) == first
    assert cli.main(["jsonl", str(inp), "--out", str(out), *extra, "--overwrite"]) == 0
    assert (out / MARKER).is_file()
    records = [r for p in ([out / "train.jsonl", out / "test.jsonl"] if split else [out]) for r in read_records(p)]
    assert sorted(r["prompt"] for r in records) == [f"q{i}" for i in range(6)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary sibling left


def test_an_existing_file_is_replaced_only_with_overwrite_and_never_an_input(tmp_path):
    inp = _input(tmp_path / "pairs.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    rc, err = _import(str(inp), "--out", str(out))
    assert rc == 2 and "exists; pass --overwrite" in err and out.read_text() == "previous\n"
    assert cli.main(["jsonl", str(inp), "--out", str(out), "--overwrite"]) == 0
    assert len(read_records(out)) == 6
    original = inp.read_bytes()
    rc, err = _import(str(inp), "--out", str(inp), "--overwrite")
    assert rc == 2 and "would overwrite the input" in err and inp.read_bytes() == original


def test_outputs_get_the_users_file_mode(tmp_path):
    inp = _input(tmp_path / "pairs.jsonl")
    umask = os.umask(0o022)
    try:
        assert cli.main(["jsonl", str(inp), "--out", str(tmp_path / "o.jsonl"), "--on-error", "skip"]) == 0
        assert cli.main(["jsonl", str(inp), "--out", str(tmp_path / "ds")]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "o.rejects.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755
