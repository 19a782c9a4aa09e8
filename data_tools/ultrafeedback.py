"""OpenBMB UltraFeedback: one instruction, K completions, each rated by GPT-4 on four aspects.

Each line becomes one K-wise ranking of its completions (prompt: one user turn; completions:
assistant replies) by a per-completion score, highest first, equal scores tied, with ``scores``.
``--score`` picks it: ``mean`` (default; the mean of the four aspect ``Rating``s, as UltraRM and
Argilla use), ``overall`` (``overall_score``, the critique score with the 2023-12 fix),
``fine-grained`` (the stored ``fine-grained_score``), or one aspect (``helpfulness``, ``honesty``,
``instruction_following``, ``truthfulness``). Ratings are strings ``"1"``-``"5"`` or ``"N/A"``:
an ``N/A`` aspect is left out of the mean; a completion without any usable score is left out of
the ranking (``meta.unscored``). A line with fewer than two scored completions is dropped.
The annotator is GPT-4 (``annotators: ["gpt-4"]``: AI feedback, not human). Everything else
(models, principles, critiques, rationales, reference answers) stays in ``meta`` in input order.
"""
from __future__ import annotations

from data_tools.base import Dropped, Source, get, judged, msg, require_object, without
from data_tools.canonical import RecordError

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def rating(value, where: str, field: str) -> float | None:
    """An aspect Rating: "1".."5" (also a number) or "N/A" (None)."""
    if isinstance(value, str) and value.strip().upper() == "N/A":
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise RecordError(where, field, f"a Rating is '1'..'5' or 'N/A', not {value!r}") from None


def score(c: dict, how: str, where: str, i: int) -> float | None:
    pre = f"completions[{i}]."
    if how in ("overall", "fine-grained"):
        key = "overall_score" if how == "overall" else "fine-grained_score"
        v = c.get(key)
        if v is None or v == "N/A":
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecordError(where, pre + key, f"must be a number, not {v!r}")
        return float(v)
    ann = get(c, "annotations", where, dict, prefix=pre)
    aspects = ASPECTS if how == "mean" else (how,)
    vals = []
    for a in aspects:
        if a not in ann:
            if how != "mean":
                raise RecordError(where, f"{pre}annotations.{a}", "is missing")
            continue
        v = rating(get(ann, f"{a}.Rating", where, (str, int, float), prefix=f"{pre}annotations."),
                   where, f"{pre}annotations.{a}.Rating")
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


class UltraFeedback(Source):
    def add_arguments(self, parser):
        parser.add_argument("--score", default="mean", choices=("mean", "overall", "fine-grained") + ASPECTS,
                            help="what ranks the completions (default: mean of the four aspect ratings)")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        instruction = get(raw, "instruction", where)
        comps = get(raw, "completions", where, list)
        texts, scores, kept, unscored = [], [], [], []
        for i, c in enumerate(comps):
            if not isinstance(c, dict):
                raise RecordError(where, f"completions[{i}]", "must be an object")
            text = get(c, "response", where, prefix=f"completions[{i}].")
            s = score(c, opts.score, where, i)
            if s is None:
                unscored.append(i)
                continue
            texts.append(text)
            scores.append(s)
            kept.append(i)
        if len(texts) < 2:
            raise Dropped(f"fewer than 2 completions with a {opts.score} score")
        meta = without(raw, "instruction", "completions")
        meta["completions"] = [without(c, "response") for c in comps]
        meta["score"] = opts.score
        if unscored:
            meta["unscored"] = unscored
            meta["kept"] = kept
        return [judged([msg("user", instruction)], [[msg("assistant", t)] for t in texts], [-s for s in scores],
                       scores=scores, annotators=["gpt-4"], meta=meta)]


SOURCE = UltraFeedback("ultrafeedback", "OpenBMB UltraFeedback: K rated completions -> rankings (N/A aware)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
