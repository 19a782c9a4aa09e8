"""The canonical record format every importer writes and every stage reads (see README.md).

JSONL, UTF-8, one object per line, ``json.dumps(rec, ensure_ascii=False, sort_keys=True)``.
Common fields: ``id`` (first 16 hex of the sha256 of the content fields), ``source``,
``annotators`` (list of str), ``meta`` (source fields not otherwise mapped, verbatim). Kinds:

* SFT:     ``{"prompt": P, "completion": C}`` or ``{"messages": [{"role", "content"}, ...]}``
* pair:    ``{"prompt": P, "chosen": C, "rejected": C}`` (+ optional ``margin``, ``weight``, ``agreement``)
* ranking: ``{"prompt": P, "completions": [C, ...], "ranks": [int, ...]}`` (0 = best; equal = tie;
           + optional ``scores``, ``weight``, ``agreement``)

P is a string or a list of messages (the conversation before the final assistant turn); C is a
string or a list of assistant messages: TRL's explicit-prompt formats, so TRL files are valid
input. ``id``/``source``/``annotators``/``meta`` may be absent from user files; importers always
write them.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CONTENT_FIELDS = ("prompt", "completion", "messages", "chosen", "rejected", "completions", "ranks")
COMMON_FIELDS = ("id", "source", "annotators", "meta")
OPTIONAL_FIELDS = ("margin", "weight", "agreement", "scores")
KNOWN_FIELDS = frozenset(CONTENT_FIELDS + COMMON_FIELDS + OPTIONAL_FIELDS)
ROLES = ("system", "user", "assistant", "tool")
_KINDS = {"sft": ("completion", "messages"), "pair": ("chosen", "rejected"), "ranking": ("completions", "ranks")}


class RecordError(ValueError):
    """A bad record: names the file and record (``where``), the field and the reason."""

    def __init__(self, where: str, field: str | None, reason: str):
        self.where, self.field, self.reason = str(where), field, reason
        super().__init__(f"{where}: field {field!r}: {reason}" if field else f"{where}: {reason}")


def record_kind(rec: dict) -> str:
    """``"sft"``, ``"pair"`` or ``"ranking"`` (raises :class:`RecordError` if none or several)."""
    kinds = [k for k, fields in _KINDS.items() if any(f in rec for f in fields)]
    if not kinds:
        raise RecordError("record", None, "not an SFT, pair or ranking record (it has none of the fields "
                                          "completion, messages, chosen, rejected, completions)")
    if len(kinds) > 1:
        raise RecordError("record", None, f"mixes the fields of several kinds ({', '.join(kinds)})")
    return kinds[0]


def record_id(rec: dict) -> str:
    """First 16 hex digits of sha256 over the content fields: the same content gives the same id."""
    content = {k: rec[k] for k in CONTENT_FIELDS if k in rec}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def text_of(value) -> str:
    """The text of a prompt/completion: the string, or the messages' contents joined."""
    if isinstance(value, str):
        return value
    return "".join(m.get("content", "") for m in value if isinstance(m, dict))


def completions_of(rec: dict) -> list[tuple[str, object]]:
    """(canonical field name, completion) pairs: what an empty-completion check looks at."""
    if "completions" in rec:
        return [(f"completions[{i}]", c) for i, c in enumerate(rec["completions"])]
    if "chosen" in rec:
        return [("chosen", rec.get("chosen")), ("rejected", rec.get("rejected"))]
    if "completion" in rec:
        return [("completion", rec["completion"])]
    last = max((i for i, m in enumerate(rec.get("messages", [])) if m.get("role") == "assistant"), default=None)
    return [] if last is None else [(f"messages[{last}].content", rec["messages"][last]["content"])]


def _check_messages(value, where: str, field: str, assistant_only: bool = False) -> None:
    if not value:
        raise RecordError(where, field, "is an empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(where, f"{field}[{i}]", "a message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(where, f"{field}[{i}].role", f"unknown role {m['role']!r} (one of {', '.join(ROLES)})")
        if assistant_only and m["role"] != "assistant":
            raise RecordError(where, f"{field}[{i}].role", f"a completion holds assistant messages, not {m['role']!r}")
        if not isinstance(m["content"], str):
            raise RecordError(where, f"{field}[{i}].content", "must be a string")


def _check_text(value, where: str, field: str, completion: bool) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_messages(value, where, field, assistant_only=completion)
        return
    raise RecordError(where, field, f"must be a string or a list of messages, not {type(value).__name__}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(rec: dict, where: str = "record") -> None:
    """Raise :class:`RecordError` naming ``where`` and the field if ``rec`` is not canonical.

    Empty completion texts are valid here (HH-RLHF has real ones); importers reject them by policy."""
    if not isinstance(rec, dict):
        raise RecordError(where, None, f"a record must be a JSON object, not {type(rec).__name__}")
    try:
        kind = record_kind(rec)
    except RecordError as e:
        raise RecordError(where, None, e.reason) from None
    prompt = rec.get("prompt")
    if "prompt" in rec:
        _check_text(prompt, where, "prompt", completion=False)
    if kind == "sft":
        if "messages" in rec:
            if "prompt" in rec:
                raise RecordError(where, "prompt", "a 'messages' record carries its prompt in the messages")
            _check_messages(rec["messages"], where, "messages")
            if not any(m["role"] == "assistant" for m in rec["messages"]):
                raise RecordError(where, "messages", "has no assistant turn")
        else:
            if "label" in rec:
                raise RecordError(where, "label", "an unpaired preference (prompt, completion, label) is not a "
                                                  "canonical kind; pair it or import it as SFT explicitly")
            if "prompt" not in rec:
                raise RecordError(where, "prompt", "is missing (a completion needs a prompt)")
            _check_text(rec["completion"], where, "completion", completion=True)
            if isinstance(prompt, str) != isinstance(rec["completion"], str):
                raise RecordError(where, "completion", "prompt and completion must both be strings or both "
                                                       "message lists")
        completions = []
    elif kind == "pair":
        for f in ("chosen", "rejected"):
            if f not in rec:
                raise RecordError(where, f, "is missing")
            _check_text(rec[f], where, f, completion="prompt" in rec)
        completions = [("chosen", rec["chosen"]), ("rejected", rec["rejected"])]
        if "prompt" not in rec and isinstance(rec["chosen"], str) != isinstance(rec["rejected"], str):
            raise RecordError(where, "rejected", "chosen and rejected must both be strings or both message lists")
    else:
        comps, ranks = rec.get("completions"), rec.get("ranks")
        if not isinstance(comps, list) or len(comps) < 2:
            raise RecordError(where, "completions", "needs a list of at least 2 completions")
        if "prompt" not in rec:
            raise RecordError(where, "prompt", "is missing (a ranking needs a prompt)")
        for i, c in enumerate(comps):
            _check_text(c, where, f"completions[{i}]", completion=True)
        if "labels" in rec and "ranks" not in rec:
            raise RecordError(where, "ranks", "is missing ('labels' looks like TRL stepwise supervision, "
                                              "which is not a ranking)")
        if (not isinstance(ranks, list) or len(ranks) != len(comps)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
            raise RecordError(where, "ranks", f"needs one integer >= 0 per completion ({len(comps)}), got {ranks!r}")
        if "scores" in rec and (not isinstance(rec["scores"], list) or len(rec["scores"]) != len(comps)
                                or not all(_is_number(s) for s in rec["scores"])):
            raise RecordError(where, "scores", "needs one finite number per completion")
        completions = [(f"completions[{i}]", c) for i, c in enumerate(comps)]
    if isinstance(prompt, str):
        for f, c in completions:
            if not isinstance(c, str):
                raise RecordError(where, f, "a string prompt needs string completions")
    for f in ("margin", "weight", "agreement"):
        if f in rec and not _is_number(rec[f]):
            raise RecordError(where, f, "must be a finite number")
    if "agreement" in rec and not 0.0 <= rec["agreement"] <= 1.0:
        raise RecordError(where, "agreement", "must be in [0, 1]")
    if "weight" in rec and rec["weight"] < 0:
        raise RecordError(where, "weight", "must be >= 0")
    if "scores" in rec and kind != "ranking":
        raise RecordError(where, "scores", "belongs to ranking records")
    for f in ("id", "source"):
        if f in rec and not isinstance(rec[f], str):
            raise RecordError(where, f, "must be a string")
    if "annotators" in rec and (not isinstance(rec["annotators"], list)
                                or not all(isinstance(a, str) for a in rec["annotators"])):
        raise RecordError(where, "annotators", "must be a list of strings")
    if "meta" in rec and not isinstance(rec["meta"], dict):
        raise RecordError(where, "meta", "must be an object")


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------------------- reading

def iter_raw(path: str | Path) -> Iterator[tuple[int, str, object]]:
    """``(number, unit, object)`` for each record of a JSONL file (also when named ``.json``), a JSON
    array or object, either gzipped (``.gz``), a Parquet file or a ``datasets.save_to_disk``
    directory. ``unit`` is "line", "record" or "row". A JSONL line that is not valid JSON yields a
    :class:`RecordError` as its object so that a caller may skip it."""
    path = Path(path)
    if path.is_dir():
        yield from ((i, "row", r) for i, r in enumerate(_load_dataset_dir(path), 1))
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise RecordError(str(path), None, f"not a readable Parquet file ({e})") from None
        yield from ((i, "row", r) for i, r in enumerate(rows, 1))
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise RecordError(str(path), None, f"cannot read as UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(str(path), None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        yield from ((i, "record", r) for i, r in enumerate(data, 1))
        return
    lines = text.splitlines()
    if stripped.startswith("{") and lines:
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            try:                                  # one pretty-printed JSON object
                yield 1, "record", json.loads(text)
                return
            except json.JSONDecodeError:
                pass
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield n, "line", json.loads(line)
            except json.JSONDecodeError as e:
                yield n, "line", RecordError(f"{path}: line {n}", None, f"invalid JSON ({e.msg} at column {e.colno})")


def _load_dataset_dir(path: Path) -> list[dict]:
    if (path / "dataset_dict.json").exists():
        raise RecordError(str(path), None, "is a DatasetDict with several splits; point at one split's directory")
    if not (path / "state.json").exists() and not (path / "dataset_info.json").exists():
        raise RecordError(str(path), None, "is a directory but not a datasets.save_to_disk directory "
                                           "(a split output directory holds one file per split: point at one)")
    import datasets
    return datasets.load_from_disk(str(path)).to_list()


def _from_columnar(row: dict) -> dict:
    """Undo the columnar encoding of :func:`write_records`: a JSON-encoded ``meta`` and the nulls
    that Parquet puts where a record lacks an optional field or a message lacks a key."""
    out = {}
    for k, v in row.items():
        if v is None:
            continue
        if k == "meta" and isinstance(v, str):
            v = json.loads(v)
        elif isinstance(v, list):
            v = [{mk: mv for mk, mv in m.items() if mv is not None} if isinstance(m, dict) else m for m in v]
        out[k] = v
    return out


def read_records(path: str | Path, validate: bool = True) -> list[dict]:
    """Canonical records from JSONL / a JSON array / Parquet / a ``datasets`` directory (as written
    by :func:`write_records`, or a TRL-format file). With ``validate`` every record is checked and
    the first bad one raises :class:`RecordError` naming file, record number and field."""
    path = Path(path)
    columnar = path.is_dir() or path.suffix == ".parquet"
    out = []
    for n, unit, rec in iter_raw(path):
        if isinstance(rec, RecordError):
            raise rec
        if columnar and isinstance(rec, dict):
            rec = _from_columnar(rec)
        if validate:
            validate_record(rec, f"{path}: {unit} {n}")
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------- writing

def output_format(path: str | Path) -> str:
    """``parquet`` for ``*.parquet``; ``datasets`` for a path ending in ``/`` or without a suffix;
    ``jsonl`` otherwise (``*.gz`` is gzipped)."""
    s = str(path)
    if s.endswith(".parquet"):
        return "parquet"
    if s.endswith(("/", os.sep)) or not Path(s).suffix:
        return "datasets"
    return "jsonl"


def _table(records: list[dict]):
    import pyarrow as pa
    keys = list(dict.fromkeys(k for r in records for k in r))      # union: kinds may be mixed
    if not records:
        return pa.table({"id": pa.array([], pa.string())})
    try:
        return pa.table({k: pa.array([dumps(r[k]) if k == "meta" and k in r else r.get(k) for r in records])
                         for k in keys})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"cannot store these records in a columnar file ({e}); a field mixes strings and "
                         "message lists or other types: write JSONL instead") from None


MARKER = ".align-import.json"   # in every directory align import writes (data_tools.outputs)


def write_marker(directory: Path, source: str) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": "align import", "source": source}) + "\n")


def user_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (0600/0700) the mode a plain ``open`` or
    ``mkdir`` would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _replace_dir(tmp: str, path: Path) -> None:
    old = None
    if path.exists():
        old = tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)
        os.replace(path, Path(old) / path.name)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_split_directory(parts: dict[str, list[dict]], directory: str | Path, fmt: str, marker: str) -> list[Path]:
    """One output per split (``NAME.jsonl``, ``NAME.parquet`` or a ``NAME`` datasets directory) in
    a temporary sibling of ``directory``, marked as align import's, then renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        names = [name if fmt == "datasets" else f"{name}.{fmt}" for name in parts]
        for name, rs in zip(names, parts.values()):
            write_records(rs, tmp / name, fmt)
        write_marker(tmp, marker)
        user_mode(tmp, directory=True)
        _replace_dir(str(tmp), directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [directory / n for n in names]


def write_records(records: list[dict], path: str | Path, fmt: str | None = None, marker: str | None = None) -> Path:
    """Write ``records`` atomically (a temporary file or directory, then ``os.replace``), with the
    user's normal file mode. Whether ``path`` may be replaced is the caller's to check
    (``data_tools.outputs.check_output``).

    ``fmt`` defaults to :func:`output_format`: JSONL (gzipped for ``*.gz``), Parquet for
    ``*.parquet`` (``meta`` stored as a JSON string), or a ``datasets.save_to_disk`` directory for
    a path without a suffix (carrying ``data_tools.outputs.MARKER`` when ``marker`` names the
    source). :func:`read_records` reads all three back to the same records."""
    fmt = fmt or output_format(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "datasets":
        import datasets
        table = _table(records)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
        quiet = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()
        try:
            datasets.Dataset(table).save_to_disk(tmp, num_shards=1)   # (one shard: an empty split reloads)
            if marker:
                write_marker(Path(tmp), marker)
            user_mode(tmp, directory=True)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if not quiet:
                datasets.utils.enable_progress_bars()
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            os.close(fd)
            pq.write_table(_table(records), tmp)
        elif fmt == "jsonl":
            data = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
            if path.suffix == ".gz":
                data = gzip.compress(data, mtime=0)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            os.close(fd)
            raise ValueError(f"unknown output format {fmt!r} (jsonl, parquet or datasets)")
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
