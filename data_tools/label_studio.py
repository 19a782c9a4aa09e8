"""Label Studio full JSON exports: the Pairwise and the Ranker (List + Ranker) templates.

* Pairwise (``data = {prompt, answer1, answer2}``, result ``{"type": "pairwise",
  "value": {"selected": "left"|"right"}}``): left means answer1 wins. A Choices result whose
  choice is "Tie" (``--tie-choice``) records a tie.
* Ranker (``data = {prompt, items: [{id, body|text|title}]}``, result ``{"type": "ranker",
  "value": {"ranker": {...}}}``): rank mode (one key, the tag's name, ids best first); bucket mode
  (several buckets: pass ``--bucket-order best,ok,bad``; items in one bucket tie; items left in
  the unsorted ``"_"`` bucket are dropped from that annotation); the legacy bare list.
* Every non-cancelled annotation is one annotator's ranking; several are aggregated
  (``--aggregate mean``: mean position per item, equal means tie; ``majority``: per pair, the
  majority order, ranks from the number of pairwise wins) with ``agreement`` = the share of
  annotator pairs that judge an item pair the same way (better / worse / tie). Drafts and predictions are not labels.
"""
from __future__ import annotations

from itertools import combinations

from data_tools.base import Source
from data_tools.canonical import RecordError

TEXT_KEYS = ("body", "text", "content", "html", "title")


def _item_text(item: dict, where: str, k: int) -> str:
    for key in TEXT_KEYS:
        if isinstance(item.get(key), str):
            return item[key]
    raise RecordError(where, f"data.items[{k}]", f"no text field (one of {TEXT_KEYS})")


def _order_from_ranker(value, ids: list[str], where: str, bucket_order):
    """Position (0 = best; equal = tie) per item id, or None for items the annotator left unsorted."""
    r = value.get("ranker") if isinstance(value, dict) else None
    if isinstance(r, list):                      # legacy: bare list
        return {i: p for p, i in enumerate(r)}
    if not isinstance(r, dict) or not r:
        raise RecordError(where, "annotations.result.value.ranker", "missing or empty")
    keys = [k for k in r if k != "_"]
    if len(keys) == 1 and "_" not in r:          # rank mode: {tag_name: [ids best first]}
        return {i: p for p, i in enumerate(r[keys[0]])}
    if not bucket_order:
        raise RecordError(where, "annotations.result.value.ranker",
                          f"bucket mode ({sorted(r)}) needs --bucket-order to know which bucket is better")
    pos = {}
    for rank, bucket in enumerate(bucket_order):
        for i in r.get(bucket, []):
            pos[i] = rank
    unknown = set(keys) - set(bucket_order)
    if unknown:
        raise RecordError(where, "annotations.result.value.ranker", f"buckets {sorted(unknown)} not in --bucket-order")
    return pos


def aggregate(orders: list[dict], ids: list[str], how: str) -> tuple[list[int], float | None]:
    """Consensus ranks over ``ids`` from several annotators' positions, and their agreement."""
    if how == "mean":
        means = []
        for i in ids:
            ps = [o[i] for o in orders if i in o]
            means.append(sum(ps) / len(ps) if ps else float("inf"))
        levels = sorted(set(means))
        ranks = [levels.index(m) for m in means]
    elif how == "majority":
        wins = [0] * len(ids)
        for a, b in combinations(range(len(ids)), 2):
            votes = [(o[ids[a]] > o[ids[b]]) - (o[ids[a]] < o[ids[b]]) for o in orders if ids[a] in o and ids[b] in o]
            s = sum(votes)
            if s < 0:
                wins[a] += 1
            elif s > 0:
                wins[b] += 1
        levels = sorted(set(wins), reverse=True)
        ranks = [levels.index(w) for w in wins]
    else:
        raise ValueError(f"--aggregate {how!r}: choose mean or majority")
    if len(orders) < 2:
        return ranks, None
    # inter-annotator agreement: over item pairs both annotators judged, the share of annotator
    # pairs giving the same judgement (better / worse / tie)
    same = total = 0
    for o1, o2 in combinations(orders, 2):
        for a, b in combinations(ids, 2):
            if a in o1 and b in o1 and a in o2 and b in o2:
                total += 1
                same += ((o1[a] > o1[b]) - (o1[a] < o1[b])) == ((o2[a] > o2[b]) - (o2[a] < o2[b]))
    return ranks, (same / total if total else None)


class LabelStudio(Source):
    def add_arguments(self, parser) -> None:
        parser.add_argument("--bucket-order", help="Ranker bucket mode: bucket names best first, comma-separated")
        parser.add_argument("--tie-choice", default="Tie", help="Choices value that marks a pairwise tie")

    def convert(self, task, where: str, opts) -> list[dict]:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RecordError(where, "data", "a task needs a 'data' object")
        data = task["data"]
        prompt = data.get("prompt", data.get("instruction", data.get("question")))
        if not isinstance(prompt, str):
            raise RecordError(where, "data.prompt", "missing (expected 'prompt', 'instruction' or 'question')")
        bucket_order = [b.strip() for b in opts.bucket_order.split(",")] if getattr(opts, "bucket_order", None) else None
        if isinstance(data.get("items"), list):
            ids = [str(it.get("id")) for it in data["items"]]
            texts = [_item_text(it, where, k) for k, it in enumerate(data["items"])]
        elif "answer1" in data and "answer2" in data:
            ids, texts = ["left", "right"], [data["answer1"], data["answer2"]]
        else:
            raise RecordError(where, "data", "neither 'items' (Ranker) nor 'answer1'/'answer2' (Pairwise)")
        orders, annotators = [], []
        for a_i, ann in enumerate(task.get("annotations") or []):
            if ann.get("was_cancelled"):
                continue
            aw = f"{where}: annotation {a_i}"
            pos = None
            for res in ann.get("result") or []:
                t = res.get("type")
                if t == "ranker":
                    pos = _order_from_ranker(res.get("value"), ids, aw, bucket_order)
                elif t == "pairwise":
                    sel = (res.get("value") or {}).get("selected")
                    if sel not in ("left", "right"):
                        raise RecordError(aw, "result.value.selected", f"expected left or right, got {sel!r}")
                    pos = {"left": 0, "right": 1} if sel == "left" else {"left": 1, "right": 0}
                elif t == "choices" and opts.tie_choice in ((res.get("value") or {}).get("choices") or []):
                    pos = {"left": 0, "right": 0}
            if pos is None:
                continue
            if not any(i in pos for i in ids):
                raise RecordError(aw, "result.value", "ranks none of the task's item ids")
            orders.append(pos)
            annotators.append(str(ann.get("completed_by", f"annotation{a_i}")))
        if not orders:
            raise RecordError(where, "annotations", "no completed ranking or pairwise annotation")
        ranks, agreement = aggregate(orders, ids, opts.aggregate)
        keep = [k for k, r in enumerate(ranks) if any(ids[k] in o for o in orders)]
        if len(keep) < 2:
            raise RecordError(where, "annotations", "fewer than 2 items were ranked")
        meta = {"task_id": task.get("id")}
        if task.get("meta"):
            meta["task_meta"] = task["meta"]
        extra = {k: v for k, v in data.items() if k not in ("prompt", "items", "answer1", "answer2")}
        if extra:
            meta["data"] = extra
        rec = {"prompt": prompt, "annotators": annotators, "meta": meta}
        if agreement is not None:
            rec["agreement"] = agreement
        texts_k, ranks_k = [texts[k] for k in keep], [ranks[k] for k in keep]
        if len(keep) == 2 and ranks_k[0] != ranks_k[1]:
            better = 0 if ranks_k[0] < ranks_k[1] else 1
            rec.update(chosen=texts_k[better], rejected=texts_k[1 - better])
        else:
            levels = sorted(set(ranks_k))
            rec.update(completions=texts_k, ranks=[levels.index(r) for r in ranks_k])
        return [rec]


SOURCE = LabelStudio("label-studio", "Label Studio JSON export (Pairwise and Ranker templates)")
