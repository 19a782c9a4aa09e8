"""NVIDIA HelpSteer2 (and HelpSteer): attribute ratings, the preference file and the disagreements file.

The file kind is detected per record. Prompts: multi-turn prompts are one string with
``"\\n<extra_id_1>Assistant\\n"`` / ``"\\n<extra_id_1>User\\n"`` markers (the first user turn has
none); they become user/assistant messages, and responses assistant replies.

* Ratings (``train``/``validation``; ``helpfulness``, ``correctness``, ``coherence``, ``complexity``,
  ``verbosity``, ints 0-4): rows are grouped by prompt (the release puts two responses per prompt
  on consecutive rows) and ranked by a score: ``--attribute`` (default helpfulness) or
  ``--weights helpfulness=0.65,correctness=0.8,...`` (weighted sum). Two responses give a pair,
  or a tie (``ranks [0, 0]``) when their scores are equal; more give a ranking with ``scores``. A
  prompt with a single response is dropped (counted). A response rated in several rows (e.g. in
  both the ratings and the disagreements file) is one completion with the mean score.
* Disagreements (the same attributes as per-annotator lists): the mean is the rating; the
  lists stay in ``meta``. ``meta.per_completion[i]`` lists the rating rows of completion i.
* Preference (``preference_strength`` -3..3; negative: response_1 better): a pair with
  ``margin = |strength|``, or a tie at 0. ``agreement`` is the share of annotator pairs in
  ``all_preferences_unprocessed`` whose strengths have the same sign. The file holds both splits:
  ``--only-split train`` keeps one (the others are counted as dropped).
"""
from __future__ import annotations

import re

from data_tools.aggregate import pairwise_agreement
from data_tools.base import (Dropped, Source, UsageError, get, judged, msg, parse_kv, require_object,
                             without)
from data_tools.canonical import RecordError

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_MARK = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


def prompt_turns(prompt: str, where: str, field: str = "prompt") -> list[dict]:
    parts = _MARK.split(prompt)
    turns = [msg("user", parts[0])]
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append(msg(role.lower(), content))
    for i, t in enumerate(turns):
        if "<extra_id_1>" in t["content"]:
            raise RecordError(where, field, f"turn {i + 1} holds a malformed <extra_id_1> marker")
        if i and t["role"] == turns[i - 1]["role"]:
            raise RecordError(where, field, f"turns {i} and {i + 1} are both {t['role']} turns")
    if turns[-1]["role"] != "user":
        raise RecordError(where, field, "the prompt must end with a user turn")
    return turns


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


class HelpSteer2(Source):
    def add_arguments(self, parser):
        parser.add_argument("--attribute", default="helpfulness", choices=ATTRIBUTES,
                            help="ratings: the attribute that ranks responses (default helpfulness)")
        parser.add_argument("--weights", metavar="ATTR=W,...",
                            help="ratings: rank by the weighted sum of attributes instead")
        parser.add_argument("--only-split", help="preference file: keep rows whose split is this")

    def weights(self, opts) -> dict:
        if not opts.weights:
            return {opts.attribute: 1.0}
        w = parse_kv(opts.weights, "--weights", float)
        unknown = set(w) - set(ATTRIBUTES)
        if unknown:
            raise UsageError(f"--weights: unknown attributes {sorted(unknown)} (one of {', '.join(ATTRIBUTES)})")
        return w

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        prompt = prompt_turns(get(raw, "prompt", where), where)
        if "preference_strength" in raw:
            return self._preference(raw, prompt, where, opts)
        response = get(raw, "response", where)
        w = state.setdefault("weights", self.weights(opts))
        score = 0.0
        for attr, wt in w.items():
            v = raw.get(attr)
            if isinstance(v, list):
                if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                    raise RecordError(where, attr, f"must be a list of numbers, not {v!r}")
                v = sum(v) / len(v)
            elif v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecordError(where, attr, f"must be a rating 0-4, not {v!r}")
            score += wt * v
        group = state.setdefault("prompts", {}).setdefault(raw["prompt"], [])
        group.append((item, prompt, response, score, without(raw, "prompt", "response")))
        return []

    def _preference(self, raw, prompt, where, opts):
        if opts.only_split and raw.get("split") != opts.only_split:
            raise Dropped(f"preference row not in split {opts.only_split}")
        r1, r2 = get(raw, "response_1", where), get(raw, "response_2", where)
        s = get(raw, "preference_strength", where, int)
        if not -3 <= s <= 3:
            raise RecordError(where, "preference_strength", f"must be in -3..3, not {s}")
        extra = {"meta": without(raw, "prompt", "response_1", "response_2")}
        strengths = []
        for i, p in enumerate(raw.get("all_preferences_unprocessed") or []):
            strengths.append(_sign(get(p, "strength", where, int, prefix=f"all_preferences_unprocessed[{i}].")))
        agreement = pairwise_agreement(strengths)
        if agreement is not None:
            extra["agreement"] = agreement
        if s:
            extra["margin"] = float(abs(s))
        return [judged(prompt, [[msg("assistant", r1)], [msg("assistant", r2)]], [int(s > 0), int(s < 0)], **extra)]

    def finish(self, opts, state):
        for rows in state.get("prompts", {}).values():
            by_response: dict[str, list] = {}            # a response rated twice (e.g. two files) is one
            for r in rows:
                by_response.setdefault(r[2], []).append(r)
            if len(by_response) < 2:
                for r in rows:
                    yield "drop", r[0], "ratings: only one response to the prompt"
                continue
            texts = list(by_response)
            scores = [sum(r[3] for r in by_response[t]) / len(by_response[t]) for t in texts]
            meta = {"score": state["weights"], "per_completion": [[r[4] for r in by_response[t]] for t in texts]}
            rec = judged(rows[0][1], [[msg("assistant", t)] for t in texts], [-s for s in scores],
                         scores=scores, meta=meta)
            yield "records", rows[0][0], [rec]


SOURCE = HelpSteer2("helpsteer2", "NVIDIA HelpSteer2 ratings (pairs by attribute/weights), preference and "
                                  "disagreements files")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
