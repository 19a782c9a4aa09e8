"""Where a tool may write a directory: never over a path it protects (its inputs, a run, the
backbone), never over files it did not write, and over its own earlier output only when asked.
``align export`` (align/export.py) and ``align import`` (data_tools/outputs.py) both use it."""
from __future__ import annotations

import os
from pathlib import Path


def inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies under it."""
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_dir(out, protected: list, overwrite: bool, marker: str, tool: str, earlier: str,
                     error: type[Exception], what: str = "") -> None:
    """Refuse the directory ``out`` with one line (``error``): it is or holds one of ``protected``
    (named as ``what``: "the input " / ""); it is a file; it holds files without ``marker`` (not
    written by ``tool``); it holds ``tool``'s ``earlier`` output and ``overwrite`` is off. A new or
    empty directory passes."""
    p = Path(out).resolve()
    for q in protected:
        if inside(Path(q).resolve(), p):
            shown = q if what else Path(q).resolve()
            raise error(f"--out {out}: that would overwrite {what}{shown}; write somewhere else")
    if not os.path.lexists(p):
        return
    if not p.is_dir():
        raise error(f"--out {out} is a file; give a new or empty directory")
    if not any(p.iterdir()):
        return
    if not (p / marker).is_file():
        raise error(f"--out {out} holds files {tool} did not write; nothing was changed: give a new or empty "
                    f"directory")
    if not overwrite:
        raise error(f"--out {out} holds {earlier}; pass --overwrite to replace it")
