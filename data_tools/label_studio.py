"""Label Studio full JSON exports (a JSON array of tasks): the Pairwise and the Ranker templates.

* Pairwise (``data = {prompt, answer1, answer2}``; result ``{"type": "pairwise", "value":
  {"selected": "left"|"right"}}``): left means answer1 wins. Pairwise has no tie: a Choices
  result whose choice is ``--tie-choice`` (default "Tie") records one. An annotation with an
  empty result (the annotator deselected) expresses no preference and is skipped.
* Ranker (``data = {prompt, items: [{id, body|text|title}]}``; result ``{"type": "ranker",
  "value": {"ranker": {...}}}``): rank mode (one key, the Ranker's name: ids best first); bucket
  mode (``--bucket-order best,ok,bad`` names the buckets best first; one bucket's items tie;
  items left in the unsorted ``"_"`` bucket are unjudged by that annotator unless ``_`` is
  listed in ``--bucket-order``); the legacy bare list. The pre-1.9 ``{items, weights,
  selected}`` shape is rejected explicitly.
* Each non-cancelled annotation is one annotator's judgement (``completed_by``); the judgements
  of one task are aggregated by ``--aggregate`` with their ``agreement``. Cancelled annotations,
  drafts and predictions are not labels (kept in ``meta``, not counted). A task without any
  completed judgement is dropped (counted).
"""
from __future__ import annotations

from data_tools.base import GROUP, Dropped, Source, content_hash, judged, require_object, without
from data_tools.canonical import RecordError

TEXT_KEYS = ("body", "text", "content", "html", "title")
PROMPT_KEYS = ("prompt", "instruction", "question", "text")


def _item_text(item, where: str, k: int) -> tuple[str, str]:
    if not isinstance(item, dict) or item.get("id") is None:
        raise RecordError(where, f"data.items[{k}]", "an item needs an 'id'")
    for key in TEXT_KEYS:
        if isinstance(item.get(key), str):
            return str(item["id"]), item[key]
    raise RecordError(where, f"data.items[{k}]", f"no text field (one of {', '.join(TEXT_KEYS)})")


def ranker_positions(value, ids: list[str], where: str, field: str, bucket_order) -> dict:
    """Position per item id (0 = best, equal = tie) for the ids this annotator judged."""
    if not isinstance(value, dict):
        raise RecordError(where, field, "must be an object")
    if "ranker" not in value and {"items", "weights"} & set(value):
        raise RecordError(where, field, "the pre-1.9 Ranker result ({items, weights, selected}) is not "
                                        "supported: re-export from Label Studio >= 1.9 (List + Ranker)")
    r = value.get("ranker")
    if isinstance(r, list):                                    # legacy bare list, best first
        pos = {str(i): p for p, i in enumerate(r)}
    elif isinstance(r, dict) and r:
        keys = [k for k in r if k != "_"]
        if len(keys) == 1 and "_" not in r:                    # rank mode {tag name: ids best first}
            pos = {str(i): p for p, i in enumerate(r[keys[0]])}
        else:
            if not bucket_order:
                raise RecordError(where, f"{field}.ranker", f"bucket mode (buckets {sorted(r)}) needs "
                                                            "--bucket-order naming the buckets best first")
            unknown = set(keys) - set(bucket_order)
            if unknown:
                raise RecordError(where, f"{field}.ranker", f"buckets {sorted(unknown)} are not in --bucket-order")
            pos = {}
            for rank, bucket in enumerate(bucket_order):
                for i in r.get(bucket) or []:
                    pos[str(i)] = rank
    else:
        raise RecordError(where, f"{field}.ranker", "is missing or empty")
    stray = set(pos) - set(ids)
    if stray:
        raise RecordError(where, f"{field}.ranker", f"ranks ids {sorted(stray)} that are not among the task's items")
    return pos


def _prompt_key(data: dict, where: str) -> str:
    """The key of the task's prompt in ``data`` (the first of PROMPT_KEYS holding a string)."""
    pkey = next((k for k in PROMPT_KEYS if isinstance(data.get(k), str)), None)
    if pkey is None:
        raise RecordError(where, "data.prompt", f"is missing (one of {', '.join(PROMPT_KEYS)})")
    return pkey


def _task_items(data: dict, pkey: str, left: str, right: str, where: str) -> tuple[list, list, set]:
    """(item ids, their texts, the data keys used) of a Ranker task (its items) or a Pairwise task
    (ids "left" and "right")."""
    if isinstance(data.get("items"), list):
        ids, texts = zip(*[_item_text(it, where, k) for k, it in enumerate(data["items"])]) if data["items"] \
            else ((), ())
        used = {pkey, "items"}
    elif left in data and right in data:
        for k in (left, right):
            if not isinstance(data[k], str):
                raise RecordError(where, f"data.{k}", "must be a string")
        ids, texts = ("left", "right"), (data[left], data[right])
        used = {pkey, left, right}
    else:
        raise RecordError(where, "data", f"neither 'items' (Ranker) nor '{left}'/'{right}' (Pairwise)")
    ids, texts = list(ids), list(texts)
    if len(set(ids)) != len(ids):
        raise RecordError(where, "data.items", "item ids are not unique")
    return ids, texts, used


def _task_meta(task: dict, data: dict, used: set) -> dict:
    """What the task holds besides its labels: its own fields, drafts and predictions, and the data keys
    that are neither the prompt nor the items."""
    meta = without(task, "data", "annotations", "drafts", "predictions")
    for k in ("drafts", "predictions"):
        if task.get(k):
            meta[k] = task[k]
    extra = without(data, *used)
    if extra:
        meta["data"] = extra
    return meta


def _annotation_positions(ann: dict, a_i: int, ids: list[str], where: str, bucket_order,
                          tie_choice: str) -> tuple[dict | None, list]:
    """(position per judged item id, or None without a ranking/pairwise result; the results not used)."""
    pos, unused = None, []
    for r_i, res in enumerate(ann.get("result") or []):
        f = f"annotations[{a_i}].result[{r_i}].value"
        t = res.get("type") if isinstance(res, dict) else None
        value = res.get("value") if isinstance(res, dict) else None
        if t == "ranker":
            pos = ranker_positions(value, ids, where, f, bucket_order)
        elif t == "pairwise":
            sel = (value or {}).get("selected")
            if sel not in ("left", "right"):
                raise RecordError(where, f + ".selected", f"expected 'left' or 'right', got {sel!r}")
            pos = {"left": 0, "right": 1} if sel == "left" else {"left": 1, "right": 0}
        elif (t == "choices" and ids == ["left", "right"]
              and tie_choice in ((value or {}).get("choices") or [])):
            pos = {"left": 0, "right": 0}
        else:
            unused.append(res)
    return pos, unused


def _annotator(ann: dict, a_i: int) -> str:
    """Who made the annotation: ``completed_by`` (a user's email or id), else ``annotation<i>``."""
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who if who is not None else f"annotation{a_i}")


def _count(notes: dict, note: str) -> None:
    notes[note] = notes.get(note, 0) + 1


class LabelStudio(Source):
    def add_arguments(self, parser) -> None:
        parser.add_argument("--bucket-order", help="Ranker bucket mode: bucket names best first, comma-separated "
                                                   "(list _ to rank the unsorted items too)")
        parser.add_argument("--tie-choice", default="Tie", help="Choices value that marks a pairwise tie (default Tie)")
        parser.add_argument("--answers", default="answer1,answer2",
                            help="Pairwise: the data keys of the left and right answer (default answer1,answer2)")

    def convert(self, item, opts, state) -> list[dict]:
        task = require_object(item.raw, item.where)
        where = item.where
        data = task.get("data")
        if not isinstance(data, dict):
            raise RecordError(where, "data", "a task needs a 'data' object")
        pkey = _prompt_key(data, where)
        prompt = data[pkey]
        bucket_order = [b.strip() for b in opts.bucket_order.split(",")] if opts.bucket_order else None
        left, right = [a.strip() for a in opts.answers.split(",")]
        ids, texts, used = _task_items(data, pkey, left, right, where)
        group = content_hash("label-studio", prompt, sorted(texts))
        meta = _task_meta(task, data, used)
        notes = state.setdefault("notes", {})
        votes = []
        for a_i, ann in enumerate(task.get("annotations") or []):
            if not isinstance(ann, dict):
                raise RecordError(where, f"annotations[{a_i}]", "must be an object")
            if ann.get("was_cancelled"):
                _count(notes, "cancelled annotations skipped")
                continue
            pos, unused = _annotation_positions(ann, a_i, ids, where, bucket_order, opts.tie_choice)
            if pos is None:
                _count(notes, "annotations without a ranking/pairwise result skipped")
                continue
            judged_ids = [i for i in ids if i in pos]
            if len(judged_ids) < 2:
                _count(notes, "annotations judging fewer than 2 items skipped")
                continue
            vote_meta = dict(meta, annotation=without(ann, "result", "completed_by"))
            if unused:
                vote_meta["annotation"]["other_results"] = unused
            votes.append(judged(prompt, [texts[ids.index(i)] for i in judged_ids], [pos[i] for i in judged_ids],
                                annotators=[_annotator(ann, a_i)], meta=vote_meta, **{GROUP: group}))
        if not votes:
            raise Dropped("task without a completed ranking or pairwise annotation")
        return votes


SOURCE = LabelStudio("label-studio", "Label Studio JSON export (Pairwise and Ranker templates)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
