"""The canonical record format every importer writes and every stage reads.

JSONL, UTF-8, one object per line, keys sorted. Common fields: ``id`` (first 16 hex of the
sha256 of the content fields), ``source``, ``annotators`` (list of str), ``meta`` (source fields
not otherwise mapped, kept verbatim). Kinds:

* SFT:     ``{"prompt": P, "completion": C}`` or ``{"messages": [{"role", "content"}, ...]}``
* pair:    ``{"prompt": P, "chosen": C, "rejected": C}`` (+ optional ``margin``, ``weight``, ``agreement``)
* ranking: ``{"prompt": P, "completions": [C, ...], "ranks": [int, ...]}`` (0 = best; equal = tie;
           + optional ``scores``, ``weight``, ``agreement``)

P is a string or a list of messages (the conversation before the final assistant turn); C is a
string or a list of assistant messages — TRL's explicit-prompt formats, so TRL files are valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from align.data.common import read_records  # noqa: F401  (re-exported: the stages' reader)

CONTENT_FIELDS = ("prompt", "completion", "messages", "chosen", "rejected", "completions", "ranks")
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A bad input record: names the file, the record number and the field."""

    def __init__(self, where: str, field: str | None, reason: str):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: field {field!r}: {reason}" if field else f"{where}: {reason}")


def record_kind(rec: dict) -> str:
    if "completions" in rec:
        return "ranking"
    if "chosen" in rec or "rejected" in rec:
        return "pair"
    if "messages" in rec or "completion" in rec:
        return "sft"
    raise RecordError("record", None, "not an SFT, pair or ranking record (no completion/messages/"
                                      "chosen/rejected/completions field)")


def record_id(rec: dict) -> str:
    content = {k: rec[k] for k in CONTENT_FIELDS if k in rec}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_text(value, where: str, field: str, allow_empty: bool = False) -> None:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise RecordError(where, field, "is empty")
        return
    if isinstance(value, list):
        if not value:
            raise RecordError(where, field, "is an empty message list")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RecordError(where, f"{field}[{i}]", "a message needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise RecordError(where, f"{field}[{i}].role", f"unknown role {m['role']!r}")
            if not isinstance(m["content"], str):
                raise RecordError(where, f"{field}[{i}].content", "must be a string")
        return
    raise RecordError(where, field, f"must be a string or a list of messages, not {type(value).__name__}")


def validate_record(rec: dict, where: str = "record") -> None:
    if not isinstance(rec, dict):
        raise RecordError(where, None, "a record must be a JSON object")
    try:
        kind = record_kind(rec)
    except RecordError as e:
        raise RecordError(where, None, e.reason) from None
    if kind == "sft":
        if "messages" in rec:
            _check_text(rec["messages"], where, "messages")
            if not any(m["role"] == "assistant" for m in rec["messages"]):
                raise RecordError(where, "messages", "has no assistant turn")
        else:
            _check_text(rec.get("prompt", ""), where, "prompt", allow_empty=True)
            _check_text(rec["completion"], where, "completion")
    elif kind == "pair":
        for f in ("chosen", "rejected"):
            if f not in rec:
                raise RecordError(where, f, "is missing")
            _check_text(rec[f], where, f)
        if "prompt" in rec:
            _check_text(rec["prompt"], where, "prompt", allow_empty=True)
        for f in ("margin", "weight", "agreement"):
            if f in rec and rec[f] is not None and not isinstance(rec[f], (int, float)):
                raise RecordError(where, f, "must be a number")
    else:
        comps, ranks = rec["completions"], rec.get("ranks")
        if not isinstance(comps, list) or len(comps) < 2:
            raise RecordError(where, "completions", "needs at least 2 completions")
        for i, c in enumerate(comps):
            _check_text(c, where, f"completions[{i}]")
        if not isinstance(ranks, list) or len(ranks) != len(comps) or not all(isinstance(r, int) for r in ranks):
            raise RecordError(where, "ranks", "needs one integer rank per completion")
        _check_text(rec.get("prompt", ""), where, "prompt", allow_empty=True)
    for f in ("annotators",):
        if f in rec and not isinstance(rec[f], list):
            raise RecordError(where, f, "must be a list")
    if "meta" in rec and not isinstance(rec["meta"], dict):
        raise RecordError(where, "meta", "must be an object")


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, sort_keys=True)


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write atomically: JSONL by default, Parquet for ``.parquet``, a ``datasets`` directory
    for a path ending in ``/`` or without a suffix that is an existing directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        rows = [{k: (json.dumps(v, ensure_ascii=False) if k == "meta" else v) for k, v in r.items()} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(dumps(r) + "\n")
    os.replace(tmp, path)
    return path
