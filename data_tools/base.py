"""The plumbing every importer shares: reading, error reporting, ids, dedup, splits, writing.

A source module defines a :class:`Source` with ``convert(raw, where, opts) -> list[dict]`` (the
canonical records one raw record yields; raise :class:`RecordError` for a bad one). ``run``
accounts for every input record as written, merged (duplicate content) or rejected.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_tools.canonical import RecordError, dumps, record_id, record_kind, validate_record, write_records


def read_raw(path: Path) -> Iterator[tuple[int, object]]:
    """(record number, raw object) from a JSON array, JSONL (also when named .json) or .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}", None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        for i, rec in enumerate(data, 1):
            yield i, rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RecordError(f"{path}: line {n}", None, f"invalid JSON ({e.msg})")


@dataclass
class Source:
    name: str
    help: str = ""

    def add_arguments(self, parser) -> None:
        pass

    def read(self, path: Path) -> Iterator[tuple[int, object]]:
        return read_raw(path)

    def where(self, path: Path, n: int) -> str:
        return f"{path}: record {n}"

    def convert(self, raw, where: str, opts) -> list[dict]:
        raise NotImplementedError


@dataclass
class Report:
    read: int = 0
    produced: int = 0
    written: int = 0
    merged: int = 0
    rejected: int = 0
    by_kind: dict = field(default_factory=dict)
    ties: int = 0
    agreements: list = field(default_factory=list)
    prompt_chars: list = field(default_factory=list)
    completion_chars: list = field(default_factory=list)

    def text(self) -> str:
        def stats(xs):
            return f"mean {statistics.mean(xs):.0f}, median {statistics.median(xs):.0f}, max {max(xs)}" if xs else "-"
        lines = [f"read {self.read} input records -> {self.produced} canonical records: written {self.written}, "
                 f"merged as duplicates {self.merged}; rejected input records {self.rejected}",
                 "by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items())),
                 f"records with ties: {self.ties}"]
        if self.agreements:
            lines.append(f"annotator agreement: mean {statistics.mean(self.agreements):.3f} over "
                         f"{len(self.agreements)} multi-annotator records")
        lines += [f"prompt length (chars): {stats(self.prompt_chars)}",
                  f"completion length (chars): {stats(self.completion_chars)}"]
        return "\n".join(lines)


def _text_len(x) -> int:
    return len(x) if isinstance(x, str) else sum(len(m.get("content", "")) for m in x)


def finalize(rec: dict, source: str) -> dict:
    rec = {k: v for k, v in rec.items() if v is not None}
    rec.setdefault("annotators", [])
    rec.setdefault("meta", {})
    rec["source"] = source
    rec["id"] = record_id(rec)
    return rec


def split_of(rec: dict, splits: dict[str, float]) -> str:
    key = json.dumps(rec.get("prompt", rec.get("messages", [])[:-1] if "messages" in rec else ""),
                     sort_keys=True, ensure_ascii=False)
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16 ** 12
    acc = 0.0
    for name, frac in splits.items():
        acc += frac
        if u < acc:
            return name
    return list(splits)[-1]


def parse_splits(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, _, frac = part.partition("=")
        try:
            out[name.strip()] = float(frac)
        except ValueError:
            raise ValueError(f"--split: {part!r} is not name=fraction") from None
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"--split fractions sum to {sum(out.values())}, not 1")
    return out


def run(source: Source, inputs: list[str], out: str, opts, *, on_error: str = "fail",
        split: str | None = None, stream=sys.stderr) -> Report:
    rep = Report()
    rejects, records, seen = [], [], {}
    for inp in inputs:
        path = Path(inp)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        for n, raw in source.read(path):
            rep.read += 1
            where = source.where(path, n)
            try:
                if isinstance(raw, RecordError):
                    raise raw
                produced = [finalize(r, source.name) for r in source.convert(raw, where, opts)]
                for r in produced:
                    validate_record(r, where)
            except RecordError as e:
                if on_error == "fail":
                    raise
                rep.rejected += 1
                rejects.append({"file": str(path), "record": n, "field": e.field, "reason": e.reason,
                                "raw": raw if not isinstance(raw, RecordError) else None})
                continue
            for r in produced:
                rep.produced += 1
                if r["id"] in seen:
                    rep.merged += 1
                    kept = seen[r["id"]]
                    kept["annotators"] = sorted(set(kept["annotators"]) | set(r["annotators"]))
                    continue
                seen[r["id"]] = r
                records.append(r)
    for r in records:
        kind = record_kind(r)
        rep.by_kind[kind] = rep.by_kind.get(kind, 0) + 1
        if kind == "ranking" and len(set(r["ranks"])) < len(r["ranks"]):
            rep.ties += 1
        if "agreement" in r:
            rep.agreements.append(r["agreement"])
        if "prompt" in r:
            rep.prompt_chars.append(_text_len(r["prompt"]))
        for c in r.get("completions", []) + [r[k] for k in ("completion", "chosen", "rejected") if k in r]:
            rep.completion_chars.append(_text_len(c))
    rep.written = len(records)
    splits = parse_splits(split)
    out_path = Path(out)
    if splits:
        parts: dict[str, list] = {name: [] for name in splits}
        for r in records:
            parts[split_of(r, splits)].append(r)
        suffix = out_path.suffix if out_path.suffix in (".parquet", ".jsonl") else ".jsonl"
        base = out_path.with_suffix("") if out_path.suffix else out_path
        for name, rs in parts.items():
            write_records(rs, base / f"{name}{suffix}")
    else:
        write_records(records, out_path)
    if on_error == "skip":
        rej_path = (out_path.with_suffix("") if out_path.suffix else out_path).parent / (
            (out_path.stem if out_path.suffix else out_path.name) + ".rejects.jsonl")
        with open(rej_path, "w", encoding="utf-8") as f:
            for r in rejects:
                f.write(dumps(r) + "\n")
    print(rep.text(), file=stream)
    return rep
