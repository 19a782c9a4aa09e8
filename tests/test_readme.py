"""README.md stays true: its config reference is the one generated from the config dataclasses."""
from __future__ import annotations

import re
from pathlib import Path

from align.docs import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_matches_the_code():
    text = README.read_text()
    section = re.search(r"<!-- config-reference -->\n(.*?)<!-- /config-reference -->", text, re.S).group(1)
    assert section == config_reference(), "README config reference is stale: run `python -m align.docs`"


def test_every_config_key_has_a_meaning():
    missing = [ln for ln in config_reference().splitlines() if ln.startswith("| `") and ln.endswith("|  |")]
    assert not missing, missing


def test_no_config_comment_line_is_dropped():
    """A comment continued on the next line counts only in the first comment's column; one in another
    column would silently vanish from the reference, so none may exist."""
    import dataclasses
    import importlib
    import inspect

    from align.docs import CONFIGS

    import typing
    todo = [getattr(importlib.import_module(module), name) for _, module, name in CONFIGS]
    found: set = set()
    while todo:
        c = todo.pop()
        for k in c.__mro__:
            if dataclasses.is_dataclass(k) and k not in found:
                found.add(k)
                for hint in typing.get_type_hints(k).values():
                    todo += [t for t in (hint, *typing.get_args(hint))
                             if isinstance(t, type) and dataclasses.is_dataclass(t)]
    dropped = []
    for c in sorted(found, key=lambda k: k.__name__):
        col = indent = None
        for line in inspect.getsource(c).splitlines():
            stripped = line.lstrip()
            here = len(line) - len(stripped)
            if stripped.startswith("#"):   # deeper than the fields: meant to continue the comment above
                if col is not None and here > indent and line.index("#") != col:
                    dropped.append(f"{c.__name__}: {line.strip()}")
            elif "#" in line and ":" in line.split("#")[0]:
                col, indent = line.index("#"), here
            else:
                col = None
    assert not dropped, dropped
