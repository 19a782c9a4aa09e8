"""Training files for the reward-model levers of benchmarks/rm_correctness.py: a pipeline's imported
rankings plus comparisons labelled by the task's answer checker.

    python benchmarks/rm_lever_data.py runs/smollm2/data --out runs/smollm2/data/levers

Writes ``rankings_heldout.jsonl`` (the pipeline's held-out rankings: the reward stage's own
``eval_fraction`` split by prompt, so the same records it held out) and, each starting with the
rest of the pipeline's rankings unchanged, for ``data.train`` with ``data.eval`` the held-out file:

* ``rankings_train.jsonl``: nothing more (for the levers that change only settings);
* ``rankings_verifier.jsonl``: + for every annotated prompt whose K samples hold a right and a wrong
  answer (the checker's verdict on the same samples the simulated people ranked), one pair per
  (right, wrong) combination, right preferred. No new sampling: what a user with a verifier gets
  from the data they already have.
* ``rankings_synthetic.jsonl``: + the task's ``correctness_pairs`` on the reward split's questions
  (``--n`` questions, two pairs each: the right answer against the same answer with the
  distractor, same length, both ended). The reward split shares no question with the held-out
  split rm_correctness.py measures on.
* ``rankings_more.jsonl`` (with ``--more``): + another pipeline's rankings, annotated the same way on
  more prompts of the same split (``annotate.prompts`` larger; the task's questions are the same
  prefix), on the prompts this pipeline did not rank. The lever "more ranked prompts".

Records on a held-out prompt are left out (for ``--more``, also those the same hash split would hold
out). Prints how many records each file adds.
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def verifier_pairs(export: list[dict]) -> list[dict]:
    """(right, wrong) pairs among each Label Studio task's items, judged by the task's checker (the
    gold's correctness term)."""
    from align.demo.tasks.short_answers import gold_terms, parse_question
    out = []
    for task in export:
        prompt, items = task["data"]["prompt"], task["data"]["items"]
        if parse_question(prompt) is None:
            continue
        right = [it for it in items if gold_terms(prompt, it["body"], it.get("ended", True))["correct"]]
        wrong = [it for it in items if it not in right]
        out += [{"prompt": prompt, "chosen": r["body"], "rejected": w["body"], "source": "verifier"}
                for r, w in product(right, wrong)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", help="a pipeline's data/ (rankings.jsonl, label_studio_export.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=384, help="reward-split questions for the synthetic pairs")
    ap.add_argument("--more", help="another pipeline's data/ annotated on more prompts (rankings.jsonl): "
                                   "its rankings on prompts not ranked here become rankings_more.jsonl")
    ap.add_argument("--eval-fraction", type=float, default=0.1, help="the reward stage's data.eval_fraction")
    a = ap.parse_args(argv)
    from align.data.common import prompt_key, read_records, split_by_prompt
    from align.demo.tasks.short_answers import correctness_pairs
    from data_tools.canonical import write_records
    d, out = Path(a.data_dir), Path(a.out)
    ranked = read_records(d / "rankings.jsonl")
    train, held = split_by_prompt(ranked, a.eval_fraction)
    held_prompts = {r["prompt"] for r in held}
    write_records(held, out / "rankings_heldout.jsonl")
    extra = {"train": [],
             "verifier": verifier_pairs(json.loads((d / "label_studio_export.json").read_text())),
             "synthetic": [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in correctness_pairs("rm", a.n)]}
    print(f"held out: {len(held)} rankings -> {out / 'rankings_heldout.jsonl'}")
    for name, pairs in extra.items():
        pairs = [p for p in pairs if p["prompt"] not in held_prompts]
        write_records(train + pairs, out / f"rankings_{name}.jsonl")
        print(f"{name}: {len(train)} rankings + {len(pairs)} pairs -> {out / f'rankings_{name}.jsonl'}")
    if a.more:
        seen = {prompt_key(r) for r in ranked}
        more_train, _ = split_by_prompt(read_records(Path(a.more) / "rankings.jsonl"), a.eval_fraction)
        new = [r for r in more_train if prompt_key(r) not in seen]   # seen holds the held-out prompts too
        write_records(train + new, out / "rankings_more.jsonl")
        print(f"more: {len(train)} rankings + {len(new)} rankings on {len({prompt_key(r) for r in new})} "
              f"more prompts -> {out / 'rankings_more.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
