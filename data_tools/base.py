"""What every importer shares: the :class:`Source` interface, input records (:class:`Item`), field
access with errors that name the field, and small builders of canonical records.

A source module defines a :class:`Source` subclass whose ``convert(item, opts, state)`` returns
the canonical records one input record yields (without ``id``/``source``; they are added by
:func:`finalize`), raises :class:`RecordError` for a malformed record or :class:`Dropped` for a
valid record that yields nothing on purpose. Sources that need several input records at once
(OASST flat messages, HelpSteer2 rating rows) keep them in ``state`` and emit records from
``finish``. Reading is :func:`data_tools.canonical.iter_raw`; dedup and aggregation live in
:mod:`data_tools.aggregate`; the import itself (accounting, splits, writing, summary) in
:mod:`data_tools.importer`. Running a source module as a script goes through
:func:`data_tools.cli.module_main`; nothing here imports the command line, the importer or the
aggregation, so every one of them can import this module (tests/test_imports.py keeps the import
graph acyclic).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from data_tools.canonical import RecordError, iter_raw, record_id

GROUP = "_group"   # private key: records with the same value are judgements of one item


class Dropped(Exception):
    """A valid input record that yields no canonical record, on purpose (reason is counted)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UsageError(ValueError):
    """A bad command-line option value."""


@dataclass
class Item:
    """One input record: its file, its number (line, record or row) and the parsed object."""
    path: Path
    n: int
    unit: str
    raw: object
    file_index: int = 0            # position of the file among the inputs (a file may be given twice)

    @property
    def where(self) -> str:
        return f"{self.path}: {self.unit} {self.n}"

    @property
    def key(self) -> tuple[int, int]:
        return (self.file_index, self.n)


# ------------------------------------------------------------------------------ helpers for sources

_MISSING = object()


def get(obj, path: str, where: str, types=str, *, default=_MISSING, prefix: str = ""):
    """``obj[a][b]...`` for ``path = "a.b"``; a missing value or a wrong type raises RecordError naming
    the field (``prefix`` + path). With ``default``, a missing or null value gives the default."""
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            if default is not _MISSING:
                return default
            raise RecordError(where, prefix + path, "is missing" if isinstance(cur, dict) else "is not an object")
        cur = cur[part]
    if types is not None and (not isinstance(cur, types) or (isinstance(cur, bool) and bool not in _tuple(types))):
        names = "/".join(t.__name__ for t in _tuple(types))
        raise RecordError(where, prefix + path, f"must be {names}, not {type(cur).__name__}")
    return cur


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def require_object(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise RecordError(where, None, f"a record must be a JSON object, not {type(raw).__name__}")
    return raw


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def dense_ranks(values: list[float], higher_is_better: bool = True) -> list[int]:
    """0 for the best value, equal values share a rank, no gaps."""
    levels = sorted(set(values), reverse=higher_is_better)
    pos = {v: i for i, v in enumerate(levels)}
    return [pos[v] for v in values]


def judged(prompt, completions: list, ranks: list[int], **extra) -> dict:
    """A judgement over ``completions``: a pair when K = 2 without a tie, else a ranking (ties kept)."""
    ranks = dense_ranks(ranks, higher_is_better=False)
    scores = extra.pop("scores", None)
    rec = {"prompt": prompt} if prompt is not None else {}
    if len(completions) == 2 and ranks[0] != ranks[1]:
        best = ranks.index(0)
        rec.update(chosen=completions[best], rejected=completions[1 - best])
        if scores is not None:
            extra.setdefault("meta", {})["scores"] = {"chosen": scores[best], "rejected": scores[1 - best]}
    else:
        rec.update(completions=list(completions), ranks=ranks)
        if scores is not None:
            rec["scores"] = list(scores)
    rec.update(extra)
    return rec


def content_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def parse_kv(spec: str, option: str, cast=str) -> dict:
    """``a=1,b=2`` -> {"a": cast("1"), ...}; a malformed entry raises UsageError naming the option."""
    out = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"{option}: {part!r} is not name=value")
        try:
            out[k.strip()] = cast(v.strip())
        except ValueError:
            raise UsageError(f"{option}: {v!r} in {part!r} is not a {cast.__name__}") from None
    return out


# ------------------------------------------------------------------------------------------ source

@dataclass
class Source:
    name: str
    help: str = ""
    empty_completions: str = "reject"     # default policy for empty completion texts

    def add_arguments(self, parser) -> None:
        pass

    def read(self, path: Path, opts) -> Iterator[Item]:
        for n, unit, raw in iter_raw(path):
            yield Item(path, n, unit, raw)

    def convert(self, item: Item, opts, state: dict) -> list[dict]:
        raise NotImplementedError

    def finish(self, opts, state: dict) -> Iterable[tuple[str, Item, object]]:
        """Events for deferred records: ("records", item, [rec...]), ("reject", item, RecordError)
        or ("drop", item, reason)."""
        return ()


def finalize(rec: dict, source: str) -> dict:
    """Drop null optional fields, fill the common fields, compute the id."""
    rec = {k: v for k, v in rec.items() if v is not None}
    rec.setdefault("annotators", [])
    rec.setdefault("meta", {})
    rec["source"] = source
    rec["id"] = record_id(rec)
    return rec
