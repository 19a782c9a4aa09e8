"""Duplicates and aggregation: records that judge the same item become one record.

Records are grouped by :func:`item_key` (prompt + set of completions, or a source's ``_group``).
Exact duplicates are removed; several different judgements are merged by :func:`merge_votes`
(``mean`` or ``majority``) with their ``agreement``, every judgement kept in ``meta.votes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from data_tools.base import GROUP, UsageError, content_hash, dense_ranks, finalize, judged
from data_tools.canonical import dumps, record_kind


def aggregate(orders: list[dict], keys: list, how: str) -> tuple[list[int], float | None]:
    """Consensus ranks over ``keys`` from several judgements (each a {key: position} map, 0 = best,
    over the keys it judged) and their agreement.

    mean: mean position per item, equal means tie. majority: per item pair the majority order;
    ranks from the number of pairwise wins (Copeland), equal wins tie. agreement: over every item
    pair two judgements both judged, the share of judgement pairs with the same verdict (better,
    worse or tie); None for a single judgement."""
    if how == "mean":
        means = []
        for k in keys:
            ps = [o[k] for o in orders if k in o]
            means.append(sum(ps) / len(ps))
        ranks = dense_ranks(means, higher_is_better=False)
    elif how == "majority":
        wins = [0] * len(keys)
        for a, b in combinations(range(len(keys)), 2):
            s = sum(_cmp(o[keys[a]], o[keys[b]]) for o in orders if keys[a] in o and keys[b] in o)
            if s < 0:
                wins[a] += 1
            elif s > 0:
                wins[b] += 1
        ranks = dense_ranks(wins)
    else:
        raise UsageError(f"--aggregate {how!r}: choose mean or majority")
    if len(orders) < 2:
        return ranks, None
    same = total = 0
    for o1, o2 in combinations(orders, 2):
        for a, b in combinations(keys, 2):
            if a in o1 and b in o1 and a in o2 and b in o2:
                total += 1
                same += _cmp(o1[a], o1[b]) == _cmp(o2[a], o2[b])
    return ranks, (same / total if total else None)


def _cmp(x, y) -> int:
    return (x > y) - (x < y)


def pairwise_agreement(verdicts: list[int]) -> float | None:
    """Share of annotator pairs giving the same verdict (e.g. the sign of a preference strength)."""
    pairs = list(combinations(verdicts, 2))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def _judgement(rec: dict) -> tuple[list, list[int]]:
    if "completions" in rec:
        return rec["completions"], rec["ranks"]
    return [rec["chosen"], rec["rejected"]], [0, 1]


def item_key(rec: dict) -> str:
    """Records with one key are judgements of the same item: same prompt, same set of completions
    (or a source-given group, e.g. one Label Studio task)."""
    if GROUP in rec:
        return rec[GROUP]
    if record_kind(rec) == "sft":
        return "sft:" + rec["id"]
    comps, _ = _judgement(rec)
    return content_hash(rec.get("prompt"), sorted(dumps(c) for c in comps))


def _signature(rec: dict) -> str:
    return dumps({k: (sorted(v) if k == "annotators" else v) for k, v in rec.items()
                  if k not in ("meta", "source", GROUP)})


def _hoist(metas: list[dict]) -> tuple[dict, list[dict]]:
    common = {k: v for k, v in metas[0].items() if all(k in m and m[k] == v for m in metas[1:])}
    return common, [{k: v for k, v in m.items() if k not in common} for m in metas]


def merge_votes(votes: list[dict], how: str, source: str) -> dict:
    """One record from several judgements of one item, with agreement and every vote kept in meta."""
    keys, comps, orders = [], {}, []
    for v in votes:
        cs, rs = _judgement(v)
        o = {}
        for c, r in zip(cs, rs):
            k = dumps(c)
            if k not in comps:
                comps[k] = c
                keys.append(k)
            o[k] = r
        orders.append(o)
    ranks, agreement = aggregate(orders, keys, how)
    order = sorted(range(len(keys)), key=lambda i: (ranks[i], i))      # best first: a pair is (chosen, rejected)
    keys, ranks = [keys[i] for i in order], [ranks[i] for i in order]
    common, rest = _hoist([v["meta"] for v in votes])
    vote_meta = []
    for v, o, m in zip(votes, orders, rest):
        entry = {"annotators": v["annotators"], "ranks": [o.get(k) for k in keys]}
        entry.update({f: v[f] for f in ("margin", "weight", "agreement") if f in v})
        if "scores" in v:
            entry["scores"] = [dict(zip([dumps(c) for c in v["completions"]], v["scores"])).get(k) for k in keys]
        if m:
            entry["meta"] = m
        vote_meta.append(entry)
    annotators = list(dict.fromkeys(a for v in votes for a in v["annotators"]))
    extra = {"annotators": annotators, "meta": {**common, "votes": vote_meta}}
    if agreement is not None:
        extra["agreement"] = agreement
    if all("scores" in v for v in votes):
        per = [[s for s in (e["scores"][i] for e in vote_meta) if s is not None] for i in range(len(keys))]
        if all(per):
            extra["scores"] = [sum(p) / len(p) for p in per]
    return finalize(judged(votes[0].get("prompt"), [comps[k] for k in keys], ranks, **extra), source)


@dataclass
class Combined:
    records: list
    duplicates: int = 0          # exact duplicates removed
    merged_votes: int = 0        # judgements folded into another record of the same item
    aggregated: int = 0          # records built from several judgements


def combine(records: list[dict], how: str, source: str) -> Combined:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(item_key(r), []).append(r)
    res = Combined([])
    for rs in groups.values():
        uniq, seen = [], {}
        for r in rs:
            sig = _signature(r)
            if sig in seen:
                res.duplicates += 1
                kept = seen[sig]
                if r["meta"] != kept["meta"] and r["meta"] not in kept["meta"].get("duplicates", []):
                    kept["meta"].setdefault("duplicates", []).append(r["meta"])
                continue
            seen[sig] = r
            uniq.append(r)
        if len(uniq) == 1:
            res.records.append(uniq[0])
        elif record_kind(uniq[0]) == "sft":      # same content, other annotators: one record
            kept = uniq[0]
            kept["annotators"] = list(dict.fromkeys(a for r in uniq for a in r["annotators"]))
            res.records.append(kept)
            res.duplicates += len(uniq) - 1
        else:
            res.records.append(merge_votes(uniq, how, source))
            res.merged_votes += len(uniq) - 1
            res.aggregated += 1
    for r in res.records:
        r.pop(GROUP, None)
    return res
