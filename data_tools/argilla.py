"""Argilla ranking and rating questions, v1 (FeedbackDataset) and v2 exports.

Layouts (detected per record):

* v1 record (``FeedbackRecord``): ``{fields, metadata, responses: [{user_id, values: {q: {value}},
  status}], suggestions, external_id}``; a ranking value is ``[{value, rank}]`` (rank from 1;
  equal ranks are ties).
* v1 Hub / ``format_as("datasets")`` row: one column per field, ``q: [{user_id, value, status}]``,
  the ranking value either dict-of-lists ``{rank: [...], value: [...]}`` (as ``datasets`` loads it)
  or a list of ``{rank, value}`` (as pyarrow reads it); ``metadata`` a JSON string.
* v2 ``to_disk`` record: ``{id, fields, metadata, suggestions, responses: {q: [{value, user_id}]}}``.
* v2 flattened row (``to_datasets``/Hub parquet): field columns plus ``q.responses``,
  ``q.responses.users``, ``q.responses.status``.

A v2 ranking value is the option list best first: v2 drops the ranks, so **ties are lost** in v2
exports. Ranking options are record field names (``reply-1`` -> the text of field ``reply-1``).
Only ``submitted`` responses count (v2 to_disk carries no status: all count); draft responses,
other questions' responses (``meta.other_responses``) and model ``suggestions`` are not labels
but are kept in ``meta``. Each user's response is one
judgement; a record's judgements are aggregated (``--aggregate``) with their ``agreement``.

Options: ``--question`` (the ranking question; default: the only one found), ``--prompt-field``
(default ``prompt``, else ``instruction``/``question``), or instead of a ranking question
``--ratings q1=field1,q2=field2`` (rating questions, one per response field; higher is better).
"""
from __future__ import annotations

import json

from data_tools.base import (GROUP, Dropped, Source, UsageError, content_hash, judged, parse_kv, require_object,
                             without)
from data_tools.canonical import RecordError

PROMPT_FIELDS = ("prompt", "instruction", "question")


def _ranking(value, where: str, field: str) -> dict:
    """{option: rank (lower is better)} from a v1 ({value, rank} list or dict-of-lists) or v2 (list) value."""
    if isinstance(value, dict) and isinstance(value.get("value"), list):          # dict-of-lists
        ranks = value.get("rank") or [None] * len(value["value"])
        value = [{"value": v, "rank": r} for v, r in zip(value["value"], ranks)]
    if not isinstance(value, list) or not value:
        raise RecordError(where, field, f"a ranking value must be a non-empty list, not {value!r}")
    if all(isinstance(v, str) for v in value):                                   # v2: options best first
        return {v: p for p, v in enumerate(value)}
    out = {}
    for i, v in enumerate(value):
        if not isinstance(v, dict) or not isinstance(v.get("value"), str):
            raise RecordError(where, f"{field}[{i}]", "a ranking entry needs a string 'value'")
        r = v.get("rank")
        if r is None:
            continue                                                             # an option left unranked
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise RecordError(where, f"{field}[{i}].rank", f"must be an integer >= 1, not {r!r}")
        out[v["value"]] = r
    return out


class Argilla(Source):
    def add_arguments(self, parser):
        parser.add_argument("--question", help="the ranking question's name (default: the only one found)")
        parser.add_argument("--prompt-field", help="the field holding the prompt (default prompt/instruction/question)")
        parser.add_argument("--ratings", metavar="Q=FIELD,...",
                            help="rank by rating questions instead, one per response field, e.g. "
                                 "rating_1=response_1,rating_2=response_2")

    @staticmethod
    def normalize(raw: dict, where: str) -> tuple[dict, dict, dict, dict]:
        """(fields, {question: [(user, value, status)]}, record meta, suggestions) for any layout."""
        if isinstance(raw.get("fields"), dict) and isinstance(raw.get("responses"), list):     # v1 record
            resp, empty = {}, []
            for i, r in enumerate(raw["responses"]):
                if not isinstance(r, dict):
                    raise RecordError(where, f"responses[{i}]", "must be an object")
                if not r.get("values"):
                    empty.append(r)                  # e.g. a discarded response without values
                for q, v in (r.get("values") or {}).items():
                    val = v.get("value") if isinstance(v, dict) else v
                    resp.setdefault(q, []).append((r.get("user_id"), val, r.get("status")))
            meta = without(raw, "fields", "responses", "suggestions")
            if empty:
                meta["responses_without_values"] = empty
            return raw["fields"], resp, meta, {"suggestions": raw.get("suggestions")}
        if isinstance(raw.get("fields"), dict) and isinstance(raw.get("responses"), dict):     # v2 to_disk
            resp = {}
            for q, lst in raw["responses"].items():
                for i, r in enumerate(lst or []):
                    if not isinstance(r, dict):
                        raise RecordError(where, f"responses.{q}[{i}]", "must be an object")
                    resp.setdefault(q, []).append((r.get("user_id"), r.get("value"), r.get("status")))
            return raw["fields"], resp, without(raw, "fields", "responses", "suggestions"), \
                {"suggestions": raw.get("suggestions")}
        if any(k.endswith(".responses") for k in raw):                                         # v2 flat
            resp, used = {}, set()
            for k in raw:
                if k.endswith(".responses"):
                    q = k[: -len(".responses")]
                    vals = raw[k] or []
                    users = raw.get(f"{q}.responses.users") or [None] * len(vals)
                    status = raw.get(f"{q}.responses.status") or [None] * len(vals)
                    if not (len(vals) == len(users) == len(status)):
                        raise RecordError(where, k, "responses, users and status lists differ in length")
                    resp[q] = list(zip(users, vals, status))
                    used |= {k, f"{q}.responses.users", f"{q}.responses.status"}
            sugg = {k: v for k, v in raw.items() if ".suggestion" in k}
            rest = {k: v for k, v in raw.items() if k not in used and k not in sugg}
            return rest, resp, {}, {"suggestions": sugg}
        resp, rest, sugg = {}, {}, {}                                                          # v1 Hub row
        for k, v in raw.items():
            if k.endswith(("-suggestion", "-suggestion-metadata")):
                sugg[k] = v
            elif isinstance(v, list) and v and all(isinstance(x, dict) and "value" in x and
                                                   ("user_id" in x or "status" in x) for x in v):
                resp[k] = [(x.get("user_id"), x.get("value"), x.get("status")) for x in v]
            elif isinstance(v, dict) and isinstance(v.get("value"), list) and "user_id" in v:   # very old layout
                n = len(v["value"])
                resp[k] = list(zip(v.get("user_id") or [None] * n, v["value"], v.get("status") or [None] * n))
            else:
                rest[k] = v
        meta = {}
        for k in ("external_id", "metadata", "vectors"):
            if k in rest:
                meta[k] = rest.pop(k)
        if isinstance(meta.get("metadata"), str):
            try:
                meta["metadata"] = json.loads(meta["metadata"])
            except json.JSONDecodeError:
                pass
        return rest, resp, meta, {"suggestions": sugg}

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        fields, responses, meta, sugg = self.normalize(raw, where)
        pf = opts.prompt_field or next((f for f in PROMPT_FIELDS if isinstance(fields.get(f), str)), None)
        if pf is None or not isinstance(fields.get(pf), str):
            raise RecordError(where, f"fields.{pf or 'prompt'}", "the prompt field is missing (--prompt-field)")
        prompt = fields[pf]
        if opts.ratings:
            per_user, texts_of, used = self._ratings(opts, responses, fields, where)
        else:
            per_user, texts_of, used = self._rankings(opts, responses, fields, where)
        group = content_hash("argilla", prompt, sorted(fields[f] for f in texts_of))
        meta = {**meta, **{k: v for k, v in sugg.items() if v}}
        unused = {k: v for k, v in fields.items() if k != pf and k not in texts_of}
        if unused:
            meta["fields"] = unused
        others = {q: [{"user_id": u, "value": v, "status": st} for u, v, st in rs
                      if q not in used or st not in (None, "submitted")] for q, rs in responses.items()}
        others = {q: rs for q, rs in others.items() if rs}
        if others:
            meta["other_responses"] = others
        votes = []
        for user, pos in per_user:
            keys = [f for f in texts_of if f in pos]
            if len(keys) < 2:
                continue
            votes.append(judged(prompt, [fields[f] for f in keys], [pos[f] for f in keys],
                                annotators=[str(user)] if user is not None else [], meta=dict(meta),
                                **{GROUP: group}))
        if not votes:
            raise Dropped("record without a submitted response to the question")
        return votes

    def _rankings(self, opts, responses, fields, where):
        q = opts.question
        if q is None:
            cands = [k for k, rs in responses.items()
                     if any(isinstance(v, list) or (isinstance(v, dict) and "value" in v) for _, v, _ in rs)]
            if len(cands) != 1:
                raise UsageError(f"{where}: found ranking questions {cands}; name one with --question")
            q = cands[0]
        per_user, texts_of = [], []
        for i, (user, value, status) in enumerate(responses.get(q, [])):
            if status not in (None, "submitted"):      # drafts and discarded responses: kept in meta
                continue
            pos = _ranking(value, where, f"{q}[{i}].value")
            for opt in pos:
                if not isinstance(fields.get(opt), str):
                    raise RecordError(where, f"{q}[{i}].value", f"ranking option {opt!r} is not a text field of "
                                                                f"the record")
                if opt not in texts_of:
                    texts_of.append(opt)
            per_user.append((user, pos))
        order = [f for f in fields if f in texts_of]       # completions in field order
        return per_user, order, {q}

    def _ratings(self, opts, responses, fields, where):
        mapping = parse_kv(opts.ratings, "--ratings")
        users: dict = {}
        for q, f in mapping.items():
            if not isinstance(fields.get(f), str):
                raise RecordError(where, f"fields.{f}", "--ratings names a field the record does not have")
            for i, (user, value, status) in enumerate(responses.get(q, [])):
                if status not in (None, "submitted"):
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RecordError(where, f"{q}[{i}].value", f"a rating must be a number, not {value!r}")
                users.setdefault(user, {})[f] = -float(value)
        return list(users.items()), list(mapping.values()), set(mapping)


SOURCE = Argilla("argilla", "Argilla v1/v2 ranking (or rating) question exports")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
