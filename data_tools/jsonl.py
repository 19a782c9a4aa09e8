"""Generic JSON/JSONL/Parquet/``datasets`` records with a column mapping given on the command line.

``--map prompt=question,chosen=good,rejected=bad`` maps canonical fields to source columns (a dotted
path such as ``info.post`` reaches into objects). Targets: ``prompt``, ``completion``, ``messages``,
``chosen``, ``rejected``, ``completions``, ``ranks``, ``scores``, ``margin``, ``weight``,
``agreement``, ``annotators`` (a list) or ``annotator`` (one value). ``completions``, ``ranks`` and
``scores`` take one list column or several columns joined with ``+`` (``completions=a+b+c``).
Scores without ranks rank the completions, higher is better, equal scores tie. Canonical column
names that are not mapped map to themselves, so canonical and TRL files import without ``--map``.
Every unmapped column stays in ``meta`` (an input ``meta`` object is merged into it; an input
``id`` is kept there only when it differs from the recomputed content id).
TRL shapes that are not canonical kinds are rejected with the reason: unpaired preferences
(``label``), stepwise supervision (``labels`` without ranks), language modelling (``text``)
and prompt-only records.
"""
from __future__ import annotations

import copy

from data_tools.base import Source, UsageError, dense_ranks, parse_kv, require_object
from data_tools.canonical import RecordError, record_id

TARGETS = ("prompt", "completion", "messages", "chosen", "rejected", "completions", "ranks", "scores", "margin",
           "weight", "agreement", "annotators", "annotator")
LISTS = ("completions", "ranks", "scores")
OPTIONAL = ("margin", "weight", "agreement", "annotators", "annotator", "scores")
_MISSING = object()


def parse_map(spec: str | None) -> dict[str, list[str]]:
    m = {k: v.split("+") for k, v in parse_kv(spec or "", "--map").items()}
    unknown = set(m) - set(TARGETS)
    if unknown:
        raise UsageError(f"--map: unknown target fields {sorted(unknown)} (one of {', '.join(TARGETS)})")
    for k, cols in m.items():
        if len(cols) > 1 and k not in LISTS:
            raise UsageError(f"--map {k}: only {', '.join(LISTS)} take several columns joined with +")
    return m


def lookup(raw: dict, path: str):
    if path in raw:
        return raw[path]
    cur = raw
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _without_paths(raw: dict, paths: set) -> dict:
    """A copy of ``raw`` without the (possibly dotted) ``paths``."""
    rest = copy.deepcopy(raw)
    for p in paths:
        if p in rest:
            del rest[p]
            continue
        *parents, leaf = p.split(".")
        cur = rest
        for part in parents:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(leaf, None)
    return rest


def _number(v, where, col, cast):
    if isinstance(v, str):
        v = v.strip()
    try:
        if isinstance(v, bool):
            raise ValueError
        out = cast(v)
        if cast is int and isinstance(v, float) and v != out:
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise RecordError(where, col, f"must be {'an integer' if cast is int else 'a number'}, not {v!r}") from None


def map_record(raw: dict, mapping: dict[str, list[str]], where: str, source_name: str, text_cells: bool) -> dict:
    """The canonical record for ``raw`` under ``mapping``. ``text_cells``: values are CSV strings,
    where an empty cell of an optional field means absent."""
    mapping = dict(mapping)
    for t in TARGETS:
        if t not in mapping and t in raw:
            mapping[t] = [t]
    rec, used = {}, set()
    for target, cols in mapping.items():
        vals = []
        for col in cols:
            v = lookup(raw, col)
            if text_cells and v == "" and target in OPTIONAL:
                v = _MISSING
            if v is _MISSING or v is None:
                if target in OPTIONAL:       # absent: an empty cell or null is consumed, not meta
                    used.update(c for c in cols if lookup(raw, c) is not _MISSING)
                    vals = None
                    break
                raise RecordError(where, col, f"is missing (mapped to {target})")
            vals.append(v)
            used.add(col)
        if vals is None:
            continue
        value = vals if len(cols) > 1 else vals[0]
        label = "+".join(cols)
        if target in LISTS and not isinstance(value, list):
            raise RecordError(where, label, f"must be a list (or map {target} to several columns with +)")
        if target == "ranks":
            value = [_number(v, where, label, int) for v in value]
        elif target == "scores":
            value = [_number(v, where, label, float) for v in value]
        elif target in ("margin", "weight", "agreement"):
            value = _number(value, where, label, float)
        elif target == "annotator":
            target, value = "annotators", [str(value)]
        elif target == "annotators":
            if not isinstance(value, list):
                raise RecordError(where, label, "must be a list (map a single column to 'annotator')")
            value = [str(a) for a in value]
        rec[target] = value
    if "scores" in rec and "ranks" not in rec and "completions" in rec:
        rec["ranks"] = dense_ranks(rec["scores"])
    if "completions" in rec and "ranks" not in rec:
        hint = " ('labels' looks like TRL stepwise supervision)" if "labels" in raw else ""
        raise RecordError(where, "ranks", f"is missing: a ranking needs ranks or scores{hint}")
    if "completion" in rec and "label" in raw:
        raise RecordError(where, "label", "an unpaired preference (prompt, completion, label) is not a canonical "
                                          "kind (importing it would turn rejected completions into SFT targets)")
    if not any(k in rec for k in ("completion", "messages", "chosen", "rejected", "completions")):
        hint = " (TRL language modelling: map it to a kind)" if "text" in raw else ""
        raise RecordError(where, None, f"maps to no completion, messages, chosen/rejected or completions{hint}; "
                                       "use --map")
    rest = _without_paths(raw, used)
    meta = dict(rest.pop("meta")) if isinstance(rest.get("meta"), dict) else {}
    for k, v in rest.items():
        if k == "id" and v == record_id(rec):
            continue
        if k == "source" and v == source_name:
            continue
        meta.setdefault(k, v)
    rec["meta"] = meta
    return rec


class JSONL(Source):
    def add_arguments(self, parser):
        parser.add_argument("--map", help="canonical=column,... e.g. prompt=question,chosen=good,rejected=bad")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        mapping = state.setdefault("map", parse_map(opts.map))
        return [map_record(raw, mapping, item.where, self.name, text_cells=False)]


SOURCE = JSONL("jsonl", "Generic JSON/JSONL/Parquet records with --map canonical=column,...")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
