"""Where ``align import`` may write: never over what it did not write, never over its own inputs.

* A file output (``*.jsonl``, ``*.jsonl.gz``, ``*.parquet``) that exists is replaced only with
  ``--overwrite``.
* A directory output (a ``datasets.save_to_disk`` directory, or the directory ``--split`` writes)
  may be new or empty; one that holds files is replaced only when it carries the marker
  ``.align-import.json`` that an earlier ``align import`` left in it, and ``--overwrite`` is given.
* An output that is, or holds, one of the inputs is refused in every case.

Everything is checked before any input is read, and written into a temporary sibling that is then
renamed into place (``canonical.write_records``), with the user's normal file mode.
"""
from __future__ import annotations

import os
from pathlib import Path

from align.outputs import check_output_dir, inside
from data_tools.base import UsageError
from data_tools.canonical import MARKER


def check_output(path: str | Path, kind: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse ``path`` (a ``kind`` = ``"file"`` or ``"directory"`` output) with a one-line reason,
    or return when writing it loses nothing a user had."""
    p = Path(path).resolve()
    for inp in inputs:   # a file output may sit beside its input; a directory may not hold one
        q = Path(inp).resolve()
        if q == p or (kind == "directory" and inside(q, p)):
            raise UsageError(f"--out {path}: that would overwrite the input {inp}; write somewhere else")
    if not os.path.lexists(p):
        return
    if kind == "file":
        if p.is_dir():
            raise UsageError(f"--out {path} is a directory; give a file name (*.jsonl, *.parquet) or a new path")
        if not overwrite:
            raise UsageError(f"--out {path} exists; pass --overwrite to replace it")
        return
    check_output_dir(path, [], overwrite, MARKER, "align import", "an earlier import", UsageError)
