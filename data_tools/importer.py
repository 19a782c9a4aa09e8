"""One import: read every input, convert, account for every record, combine, split, write, report.

:func:`run` accounts for every input record (converted, dropped with a reason, or rejected with
file, record number, field and reason) and for every produced canonical record (written, removed
as an exact duplicate, or merged with the other judgements of its item).
"""
from __future__ import annotations

import hashlib
import statistics
import sys
from dataclasses import dataclass, field
from contextlib import contextmanager
from pathlib import Path

from data_tools.aggregate import combine
from data_tools.base import Dropped, Item, Source, UsageError, finalize, parse_kv
from data_tools.canonical import (RecordError, completions_of, dumps, output_format, record_kind, text_of,
                                  validate_record, write_records, write_split_directory)
from data_tools.outputs import check_output


# ------------------------------------------------------------------------------------------ splits

def _shared_text_prompt(a: str, b: str) -> str:
    """The prompt two texts share: their common beginning cut back to a word boundary, and in the
    HH-RLHF layout to just after the last ``Assistant:`` header, so that the replies' own first
    words (which two pairs of one conversation may or may not share) never enter the key."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = max(a.rfind(" ", 0, n + 1), 0) if n < min(len(a), len(b)) else n
    p = a[:cut]
    turn = p.rfind("\n\nAssistant:")
    return p[:turn + len("\n\nAssistant:")] if turn >= 0 else p


def split_key(rec: dict) -> str:
    """What decides a record's split: the prompt, and for conversations only the first user turn,
    so that every record of one conversation tree (and every record of one prompt) shares a split."""
    p = rec.get("prompt")
    if p is None and "messages" in rec:
        p = rec["messages"]
    if p is None:                                   # implicit-prompt pair: the shared beginning
        a, b = rec.get("chosen"), rec.get("rejected")
        if isinstance(a, list):
            p = a
        else:
            p = _shared_text_prompt(a, b)
    if isinstance(p, list):
        users = [m.get("content", "") for m in p if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users else dumps(p)
    return p


def parse_splits(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    out = parse_kv(spec, "--split", float)
    if not out or any(f < 0 for f in out.values()):
        raise UsageError(f"--split {spec!r}: give name=fraction pairs with fractions >= 0")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise UsageError(f"--split fractions sum to {sum(out.values()):g}, not 1")
    return out


def split_of(rec: dict, splits: dict[str, float]) -> str:
    u = int(hashlib.sha256(split_key(rec).encode("utf-8")).hexdigest()[:15], 16) / 16 ** 15
    acc = 0.0
    for name, frac in splits.items():
        acc += frac
        if u < acc:
            return name
    return list(splits)[-1]


# ----------------------------------------------------------------------------------------- summary

def _stats(xs: list[int]) -> str:
    if not xs:
        return "-"
    s = sorted(xs)
    return (f"n {len(s)}, min {s[0]}, median {statistics.median(s):g}, mean {statistics.mean(s):.1f}, "
            f"p95 {s[min(len(s) - 1, int(0.95 * len(s)))]}, max {s[-1]}")


@dataclass
class Report:
    source: str = ""
    read: int = 0
    converted: int = 0
    rejected: int = 0
    dropped: dict = field(default_factory=dict)     # reason -> count
    produced: int = 0
    duplicates: int = 0
    merged_votes: int = 0
    aggregated: int = 0
    written: int = 0
    by_kind: dict = field(default_factory=dict)
    ties: int = 0
    agreements: list = field(default_factory=list)
    prompt_chars: list = field(default_factory=list)
    completion_chars: list = field(default_factory=list)
    splits: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)       # source notes, e.g. parts of records left out
    outputs: list = field(default_factory=list)
    rejects_path: str | None = None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "converted": self.converted, "rejected": self.rejected,
                "dropped": dict(self.dropped), "produced": self.produced, "duplicates": self.duplicates,
                "merged_votes": self.merged_votes, "aggregated": self.aggregated, "written": self.written,
                "by_kind": dict(self.by_kind), "ties": self.ties, "splits": dict(self.splits),
                "notes": dict(self.notes)}

    def text(self) -> str:
        lines = [f"{self.source}: read {self.read} input records: {self.converted} converted, "
                 f"{self.dropped_total} dropped, {self.rejected} rejected (skipped)"]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n}: {reason}")
        for note, n in sorted(self.notes.items()):
            lines.append(f"  note: {note}: {n}")
        lines.append(f"canonical records: {self.produced} produced -> {self.written} written, "
                     f"{self.duplicates} exact duplicates removed, {self.merged_votes} merged as further "
                     f"judgements into {self.aggregated} aggregated records")
        lines.append("by kind: " + (", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items())) or "-"))
        lines.append(f"ties: {self.ties} records with tied completions")
        if self.agreements:
            lines.append(f"agreement: mean {statistics.mean(self.agreements):.3f}, min {min(self.agreements):.3f} "
                         f"over {len(self.agreements)} records")
        else:
            lines.append("agreement: - (no item with several judgements)")
        lines.append(f"prompt chars: {_stats(self.prompt_chars)}")
        lines.append(f"completion chars: {_stats(self.completion_chars)}")
        if self.splits:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        for o in self.outputs:
            lines.append(f"wrote {o}")
        if self.rejects_path:
            lines.append(f"wrote {self.rejected} rejects to {self.rejects_path}")
        return "\n".join(lines)

    def count(self, records: list[dict]) -> None:
        for r in records:
            kind = record_kind(r)
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if kind == "ranking" and len(set(r["ranks"])) < len(r["ranks"]):
                self.ties += 1
            if "agreement" in r:
                self.agreements.append(r["agreement"])
            if "messages" in r:
                last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
                self.prompt_chars.append(len(text_of(r["messages"][:last])))
            elif "prompt" in r:
                self.prompt_chars.append(len(text_of(r["prompt"])))
            for _, c in completions_of(r):
                self.completion_chars.append(len(text_of(c)))


# --------------------------------------------------------------------------------------------- run

def rejects_path_for(out: str | Path) -> Path:
    p = Path(out)
    name = p.name
    for suf in (".gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return p.parent / f"{name}.rejects.jsonl"


def output_plan(out: str, splits: dict | None, fmt: str | None) -> tuple[Path, str, str]:
    """(the path written, "file" or "directory", the format) of an import's main output."""
    out_path = Path(out)
    if splits:
        directory = out_path
        if out_path.suffix in (".jsonl", ".parquet"):     # out.jsonl -> out/train.jsonl, ...
            directory, fmt = out_path.with_suffix(""), fmt or out_path.suffix[1:]
        return directory, "directory", fmt or "jsonl"
    fmt = fmt or output_format(out_path)
    return out_path, "directory" if fmt == "datasets" else "file", fmt


class _Accounts:
    """Where each input item went (converted, dropped with a reason, rejected with the error) and the
    canonical records the converted ones produced, checked."""

    def __init__(self, source: Source, rep: Report, on_error: str, empty: str):
        self.source, self.rep, self.on_error, self.empty = source, rep, on_error, empty
        self.status: dict[tuple, str] = {}
        self.rejects: list[dict] = []
        self.produced: list[dict] = []

    def reject(self, item: Item, err: RecordError) -> None:
        if self.on_error == "fail":
            raise err
        self.status[item.key] = "rejected"
        raw = item.raw if not isinstance(item.raw, RecordError) else None
        self.rejects.append({"file": str(item.path), "record": item.n, "unit": item.unit, "field": err.field,
                             "reason": err.reason, "error": str(err), "raw": raw})

    def drop(self, item: Item, reason: str) -> None:
        self.status[item.key] = "dropped"
        self.rep.dropped[reason] = self.rep.dropped.get(reason, 0) + 1

    @contextmanager
    def outcome(self, item: Item):
        """Account for ``item`` as dropped or rejected when converting it raises :class:`Dropped` or
        :class:`RecordError` in the ``with`` block."""
        try:
            yield
        except Dropped as d:
            self.drop(item, d.reason)
        except RecordError as e:
            self.reject(item, e)

    def add(self, recs: list[dict], item: Item) -> None:
        self.produced.extend(self.prepare(recs, item))

    def prepare(self, recs: list[dict], item: Item) -> list[dict]:
        """The records of one item, finalized and validated, less pairs without a preference."""
        out_recs, same = [], 0
        for r in recs:
            r = finalize(r, self.source.name)
            validate_record(r, item.where)
            if "chosen" in r and r["chosen"] == r["rejected"]:
                same += 1
                continue
            self.check_completions(r, item)
            out_recs.append(r)
        if recs and not out_recs:
            raise Dropped("chosen and rejected are identical (no preference)")
        if same:
            note = "pairs left out: chosen and rejected are identical (no preference)"
            self.rep.notes[note] = self.rep.notes.get(note, 0) + same
        return out_recs

    def check_completions(self, r: dict, item: Item) -> None:
        """A record's completions are distinct, and (unless --empty-completions keep) none is empty."""
        if "completions" in r:
            seen = {}
            for i, c in enumerate(r["completions"]):
                j = seen.setdefault(dumps(c), i)
                if j != i:
                    raise RecordError(item.where, f"completions[{i}]", f"repeats completions[{j}]")
        if self.empty == "reject":
            for f, c in completions_of(r):
                if not text_of(c).strip():
                    raise RecordError(item.where, f, "the completion is empty (pass --empty-completions "
                                                     "keep to import empty completions)")


def _check_outputs(out: str, inputs: list[str], splits: dict | None, fmt: str | None, on_error: str,
                   overwrite: bool) -> tuple[Path, str]:
    """(the path written, the format) of the main output, once it and the rejects file may be written."""
    target, kind, fmt = output_plan(out, splits, fmt)
    check_output(target, kind, inputs, overwrite)
    if on_error == "skip":
        check_output(rejects_path_for(out), "file", inputs, overwrite)
    return target, fmt


def _aggregation(opts) -> str:
    how = getattr(opts, "aggregate", "mean") or "mean"
    if how not in ("mean", "majority"):
        raise UsageError(f"--aggregate {how!r}: choose mean or majority")
    return how


def _read_inputs(source: Source, inputs: list[str], opts, state: dict, acc: _Accounts) -> None:
    """Read and convert every record of every input file, in order."""
    for i, inp in enumerate(inputs):
        path = Path(inp)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        for item in source.read(path, opts):
            item.file_index = i
            acc.rep.read += 1
            acc.status[item.key] = "converted"
            with acc.outcome(item):
                acc.add(_convert(source, item, opts, state), item)


def _convert(source: Source, item: Item, opts, state: dict) -> list[dict]:
    """The source's records of one item, or the error reading it already met."""
    if isinstance(item.raw, RecordError):
        raise item.raw
    return source.convert(item, opts, state)


def _finish_source(source: Source, opts, state: dict, acc: _Accounts) -> None:
    """What the source decides once it has seen every input (records, rejects and drops per item)."""
    for event, item, payload in source.finish(opts, state):
        if acc.status.get(item.key) == "rejected":
            continue
        if event == "records":
            with acc.outcome(item):
                acc.add(payload, item)
        elif event == "reject":
            acc.reject(item, payload)
        elif event == "drop":
            acc.drop(item, payload)
    for note, n in state.get("notes", {}).items():
        acc.rep.notes[note] = acc.rep.notes.get(note, 0) + n


def _combine(acc: _Accounts, how: str) -> list[dict]:
    """The records to write: the produced ones less exact duplicates, each item's judgements merged;
    the report counts every step."""
    rep = acc.rep
    rep.converted = sum(s == "converted" for s in acc.status.values())
    rep.rejected = sum(s == "rejected" for s in acc.status.values())
    rep.produced = len(acc.produced)
    comb = combine(acc.produced, how, acc.source.name)
    records = comb.records
    for r in records:
        validate_record(r, "aggregated record")
    rep.duplicates, rep.merged_votes, rep.aggregated = comb.duplicates, comb.merged_votes, comb.aggregated
    rep.written = len(records)
    rep.count(records)
    return records


def _write(records: list[dict], target: Path, fmt: str, splits: dict | None, marker: str, rep: Report) -> None:
    """Write the records to one output, or with ``splits`` one file per split."""
    if splits:
        parts: dict[str, list] = {name: [] for name in splits}
        for r in records:
            parts[split_of(r, splits)].append(r)
        written = write_split_directory(parts, target, fmt, marker)
        for (name, rs), path in zip(parts.items(), written):
            rep.splits[name] = len(rs)
            rep.outputs.append(str(path))
    else:
        write_records(records, target, fmt, marker=marker)
        rep.outputs.append(str(target))


def run(source: Source, inputs: list[str], out: str, opts, *, on_error: str = "fail", split: str | None = None,
        fmt: str | None = None, stream=None, overwrite: bool = False) -> Report:
    """Import ``inputs`` with ``source`` into ``out``. With ``on_error="fail"`` the first bad record
    raises :class:`RecordError` and nothing is written. Outputs that would replace what align import
    did not write (or, without ``overwrite``, anything) are refused before any input is read
    (``data_tools.outputs``)."""
    stream = sys.stdout if stream is None else stream
    splits = parse_splits(split)
    target, fmt = _check_outputs(out, inputs, splits, fmt, on_error, overwrite)
    how = _aggregation(opts)
    empty = getattr(opts, "empty_completions", None) or source.empty_completions
    rep = Report(source=source.name)
    acc = _Accounts(source, rep, on_error, empty)
    state: dict = {}
    _read_inputs(source, inputs, opts, state, acc)
    _finish_source(source, opts, state, acc)
    records = _combine(acc, how)
    _write(records, target, fmt, splits, source.name, rep)
    if on_error == "skip":
        rp = rejects_path_for(out)
        write_records(acc.rejects, rp, "jsonl")
        rep.rejects_path = str(rp)
    print(rep.text(), file=stream)
    return rep
