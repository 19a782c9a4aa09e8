"""Reading record files and splitting them by prompt."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """Records from JSONL (``.jsonl``, or ``.json`` holding one object per line), a JSON array,
    Parquet, or a ``datasets`` directory saved with ``save_to_disk``. Errors name file and line."""
    path = Path(path)
    if path.is_dir():
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits ({list(ds)}); point at one of them")
        return [dict(r) for r in ds]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return list(data)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {n}: a record must be a JSON object")
        out.append(rec)
    return out


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
