"""OpenAI summarize_from_feedback: ``comparisons/*.json`` and ``axis_evals/*.json`` (JSONL named .json).

Prompts use TRL's templates: TL;DR rows (``info.post``) ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE:
{title}\\n\\nPOST: {post}\\n\\nTL;DR:"``; CNN/DM rows (``info.article``) ``"Article:\\n{article}\\n\\nTL;DR:"``.
Summary texts are kept verbatim (they start with a space).

* Comparison line: ``summaries[choice]`` is chosen over the other; ``worker`` is the annotator.
  Several workers on the same post and summaries are aggregated into one record (``--aggregate``)
  with their agreement. ``--ref-sft`` also emits each ``policy == "ref"`` summary (the human
  reference TL;DR) as an SFT record.
* Axis-eval line (one summary rated on Likert axes): lines are grouped by prompt; the summaries of
  one post are ranked by the mean of ``--axis`` (default overall) over workers, with ``scores``.
  A post with fewer than two rated summaries yields nothing (counted as dropped).
"""
from __future__ import annotations

from data_tools.base import Dropped, Source, get, judged, require_object, without
from data_tools.canonical import RecordError


def prompt_of(raw: dict, where: str) -> tuple[str, dict]:
    """The prompt and what is left of ``info``."""
    info = get(raw, "info", where, dict)
    if info.get("article") is not None:
        article = get(info, "article", where, prefix="info.")
        return f"Article:\n{article}\n\nTL;DR:", without(info, "article")
    post = get(info, "post", where, prefix="info.")
    title = get(info, "title", where, prefix="info.")
    subreddit = get(info, "subreddit", where, prefix="info.")
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:", without(info, "post", "title",
                                                                                         "subreddit")


class Summarize(Source):
    def add_arguments(self, parser):
        parser.add_argument("--axis", default="overall", help="axis evals: the axis to rank by (default overall)")
        parser.add_argument("--ref-sft", action="store_true",
                            help="comparisons: also emit each policy=ref summary as an SFT record")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        if "summary" in raw and "summaries" not in raw:
            return self._axis(item, raw, opts, state)
        where = item.where
        prompt, info = prompt_of(raw, where)
        summaries = get(raw, "summaries", where, list)
        if len(summaries) != 2:
            raise RecordError(where, "summaries", f"a comparison has 2 summaries, not {len(summaries)}")
        texts = [get(s, "text", where, prefix=f"summaries[{i}].") for i, s in enumerate(summaries)]
        choice = get(raw, "choice", where, int)
        if choice not in (0, 1):
            raise RecordError(where, "choice", f"must be 0 or 1, not {choice}")
        worker = raw.get("worker")
        meta = without(raw, "info", "summaries", "worker")
        meta["info"] = info
        meta["summaries"] = [without(s, "text") for s in summaries]
        annotators = [str(worker)] if worker is not None else []
        out = [{"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice],
                "annotators": annotators, "meta": meta}]
        if getattr(opts, "ref_sft", False):
            for s, t in zip(summaries, texts):
                if s.get("policy") == "ref":
                    out.append({"prompt": prompt, "completion": t, "meta": {"info": info, **without(s, "text")}})
        return out

    def _axis(self, item, raw, opts, state):
        where = item.where
        prompt, info = prompt_of(raw, where)
        summary = get(raw, "summary", where, dict)
        text = get(summary, "text", where, prefix="summary.")
        axes = get(summary, "axes", where, dict, prefix="summary.")
        value = axes.get(opts.axis)
        if value is None:
            raise Dropped(f"axis eval without a value for axis {opts.axis!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(where, f"summary.axes.{opts.axis}", f"must be a number, not {value!r}")
        group = state.setdefault("posts", {}).setdefault(prompt, {"items": [], "info": info, "summaries": {}})
        group["items"].append(item)
        rating = {**without(raw, "info", "summary"), **without(summary, "text")}
        group["summaries"].setdefault(text, []).append((float(value), rating))
        return []

    def finish(self, opts, state):
        for prompt, g in state.get("posts", {}).items():
            if len(g["summaries"]) < 2:
                for it in g["items"]:
                    yield "drop", it, "axis evals: fewer than 2 rated summaries of one post"
                continue
            texts = list(g["summaries"])
            scores = [sum(v for v, _ in g["summaries"][t]) / len(g["summaries"][t]) for t in texts]
            workers = list(dict.fromkeys(str(r["worker"]) for t in texts for _, r in g["summaries"][t]
                                         if r.get("worker") is not None))
            meta = {"info": g["info"], "axis": opts.axis,
                    "per_completion": [[r for _, r in g["summaries"][t]] for t in texts]}
            rec = judged(prompt, texts, [-s for s in scores], scores=scores, annotators=workers, meta=meta)
            yield "records", g["items"][0], [rec]


SOURCE = Summarize("summarize-from-feedback", "OpenAI summarize_from_feedback comparisons and axis evals")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
