"""Stanford SHP: ``<subreddit>/{train,validation,test}.json`` (JSONL named .json).

``labels == 1`` means comment A (``human_ref_A``) is preferred, 0 means B; the side is randomized,
so it is never assumed. The prompt (``history``) becomes a single user turn, the comments
assistant replies. The preference is a collective vote (no annotator ids, no ties).
``--min-ratio R`` keeps pairs with ``score_ratio >= R`` (the card recommends filtering by it; it
can be as low as 1); the others are counted as dropped. Every other field stays in ``meta``.
"""
from __future__ import annotations

from data_tools.base import Dropped, Source, get, msg, require_object, without
from data_tools.canonical import RecordError


class SHP(Source):
    def add_arguments(self, parser):
        parser.add_argument("--min-ratio", type=float, default=None,
                            help="keep pairs whose score_ratio (preferred/other score) is at least this")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        history = get(raw, "history", where)
        a, b = get(raw, "human_ref_A", where), get(raw, "human_ref_B", where)
        label = get(raw, "labels", where, int)
        if label not in (0, 1):
            raise RecordError(where, "labels", f"must be 1 (A preferred) or 0 (B preferred), not {label}")
        ratio = get(raw, "score_ratio", where, (int, float), default=None)
        if opts.min_ratio is not None:
            if ratio is None:
                raise RecordError(where, "score_ratio", "is missing but --min-ratio needs it")
            if ratio < opts.min_ratio:
                raise Dropped(f"score_ratio below --min-ratio {opts.min_ratio:g}")
        chosen, rejected = (a, b) if label == 1 else (b, a)
        return [{"prompt": [msg("user", history)], "chosen": [msg("assistant", chosen)],
                 "rejected": [msg("assistant", rejected)],
                 "meta": without(raw, "history", "human_ref_A", "human_ref_B")}]


SOURCE = SHP("shp", "Stanford SHP Reddit preference pairs (score-ratio filter --min-ratio)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
