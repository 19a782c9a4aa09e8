"""Reading record files and splitting them by prompt."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """Canonical records from JSONL/JSON/Parquet or a ``datasets`` directory (see data_tools)."""
    from data_tools.canonical import read_records as _read
    return _read(path)


def prompt_key(record: dict) -> str:
    """A hash of the record's prompt (for 'messages' records: every turn before the last)."""
    if "prompt" in record:
        p = record["prompt"]
    elif "messages" in record:
        p = record["messages"][:-1]
    else:
        p = record.get("chosen", "")
    return hashlib.sha256(json.dumps(p, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split_by_prompt(records: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split: a prompt's hash decides its side, so no prompt is on both sides."""
    train, held = [], []
    for r in records:
        u = int(prompt_key(r)[:12], 16) / 16 ** 12
        (held if u < eval_fraction else train).append(r)
    return train, held
