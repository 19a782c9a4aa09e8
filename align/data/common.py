"""Reading record files and splitting them by prompt."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from align.data.chat import PROMPT_ENDS
from align.data.records import Record, where_of

COMPLETION_FIELDS = ("completion", "chosen", "rejected")


def as_chat(record: dict) -> dict:
    """``record`` with its plain-text prompt as one user turn and each plain-text completion
    (``completion``, ``chosen``, ``rejected``, every one of ``completions``) as one assistant turn,
    so the chat template renders them (``data.chat: true``). Plain text is what annotation tools
    export; a chat model is trained and sampled on its template. Message lists stay as they are."""
    out = Record(record, where_of(record, ""))
    if isinstance(out.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
    for key in COMPLETION_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = [{"role": "assistant", "content": out[key]}]
    if isinstance(out.get("completions"), list):
        out["completions"] = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c
                              for c in out["completions"]]
    return out


def read_records(path: str | Path, chat: bool = False) -> list[dict]:
    """Records from JSONL (``.jsonl``, or ``.json`` holding one object per line), a JSON array,
    Parquet, a ``datasets`` directory saved with ``save_to_disk``, or, when no such path exists, a
    Hugging Face Hub dataset id ``org/name[@revision][:split]`` read from the local cache
    (align/hub.py). Errors name file and line (for a Hub dataset: ``org/name:split: row N``).
    ``chat``: plain-text prompts and completions become conversation turns (``as_chat``)."""
    records = _read(path)
    return [as_chat(r) if isinstance(r, dict) else r for r in records] if chat else records


def _read(path: str | Path) -> list[dict]:
    if not Path(path).exists():
        from align.hub import read_dataset
        rows = read_dataset(path)   # None: not a Hub dataset id either (the read below says so)
        if rows is not None:
            return rows
    path = Path(path)
    if path.is_dir():
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits ({list(ds)}); point at one of them")
        return [Record(r, f"{path}: row {i}") for i, r in enumerate(ds, 1)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return [Record(r, f"{path}: row {i}") for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"save the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        out = []
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: record {i} of the JSON array is a {type(rec).__name__}, not an object")
            out.append(Record(rec, f"{path}: record {i}"))
        return out
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
        out.append(Record(rec, f"{path}: line {n}"))
    return out


ASSISTANT_TURN = "\n\nAssistant:"          # HH-RLHF's header of an assistant turn


def implicit_prompt(chosen, rejected):
    """The prompt of an implicit-prompt pair ``{chosen, rejected}``: their shared beginning, as
    :func:`align.data.preferences._common_prefix` takes it. For a string conversation in the
    HH-RLHF layout the prefix is further cut after its last ``Assistant:`` header, so two replies
    that happen to start with the same words do not move the pair to another prompt."""
    from align.data.preferences import _common_prefix
    prompt = _common_prefix(chosen, rejected)[0]
    if isinstance(prompt, str):
        cut = prompt.rfind(ASSISTANT_TURN)
        if cut >= 0:
            prompt = prompt[:cut + len(ASSISTANT_TURN)]
    return prompt


def prompt_key(record: dict) -> str:
    """A hash of the record's prompt (for 'messages' records: every turn before the last, or all of
    them when the last is a user turn, a prompt to continue; for
    implicit-prompt pairs the shared beginning of 'chosen' and 'rejected', never all of 'chosen')."""
    if "prompt" in record:
        p = record["prompt"]
    elif "messages" in record:   # a demonstration: the turns before its last; a prompt conversation: all
        msgs = record["messages"]
        ends_prompt = isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and \
            msgs[-1].get("role") in PROMPT_ENDS
        p = msgs if ends_prompt else msgs[:-1]
    elif "chosen" in record and "rejected" in record:
        p = implicit_prompt(record["chosen"], record["rejected"])
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


def check_eval_split(n_eval: int, *, file: str, fraction: float, train: str, what: str = "records",
                     file_key: str = "data.eval", fraction_key: str = "data.eval_fraction") -> bool:
    """Whether the stage evaluates at all. Eval data is optional: no held-out file and a zero
    fraction mean no evaluation, and nothing is logged for it. A held-out file, or a non-zero
    fraction, that yields no eval ``what`` is a configuration error naming the file or setting
    (instead of an eval loss of 0 over no tokens); raise it before training starts."""
    from align.config import ConfigError
    if n_eval:
        return True
    if file:
        raise ConfigError(f"{file_key}: {file} yields no eval {what}; give held-out data there, or leave "
                          f"{file_key} empty and set {fraction_key}=0 to train without evaluation")
    if fraction > 0:
        raise ConfigError(f"{fraction_key}={fraction:g} holds out no eval {what} from {train} (the split is "
                          f"by prompt hash); raise it, give held-out data in {file_key}, or set {fraction_key}=0 "
                          f"to train without evaluation")
    return False


def load_preference_splits(data) -> tuple[list, list, bool]:
    """A preference stage's (reward, DPO) train and eval groups from ``data.train`` and
    ``data.eval`` (or ``data.eval_fraction`` of train, split by prompt), and whether there is an
    eval split (a configured split that holds nothing is refused; none configured: no eval)."""
    from align.config import ConfigError, require_file
    from align.data.preferences import to_group
    from align.rl.losses import counts_in_loss
    records = require_records(read_records(require_file(data.train, "data.train"), data.chat), data.train, "data.train")
    if data.eval:
        eval_records = require_records(read_records(require_file(data.eval, "data.eval"), data.chat), data.eval,
                                       "data.eval")
    else:
        records, eval_records = split_by_prompt(records, data.eval_fraction)
    groups = [to_group(r, where_of(r, f"{data.train}: record {i}")) for i, r in enumerate(records, 1)]
    eval_groups = [to_group(r, where_of(r, f"{data.eval or data.train}: record {i}"))
                   for i, r in enumerate(eval_records, 1)]
    has_eval = check_eval_split(len(eval_groups), file=data.eval, fraction=data.eval_fraction, train=data.train)
    ties = getattr(data, "ties", "skip")
    if not any(counts_in_loss(g.ranks, ties) and g.weight > 0 for g in groups):
        raise ConfigError(f"data.train: no record of {data.train} can teach anything (every ranking is all tied "
                          f"or has weight 0): the loss would be 0 at every step")
    if has_eval and not any(counts_in_loss(g.ranks, ties) for g in eval_groups):
        raise ConfigError(f"data.eval: no held-out record of {data.eval or data.train} ranks one completion above "
                          f"another (all tied): held-out accuracy would be undefined")
    return groups, eval_groups, has_eval


def require_records(records: list, file, key: str) -> list:
    """``records``, or a config error when the file held none (not a misleading message later)."""
    if not records:
        from align.config import ConfigError
        raise ConfigError(f"{key}: {file} holds no records")
    return records

