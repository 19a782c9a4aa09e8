"""benchmarks/rm_lever_data.py: the reward-model lever files (verifier-labelled pairs from the
annotated samples, the task's synthetic correctness pairs) keep the reward stage's held-out split."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rm_lever_data import main, verifier_pairs  # noqa: E402

SUM = "Liam has 2 pencils and gets 7 more. How many pencils does Liam have now?"


def _task(prompt: str, *bodies: str) -> dict:
    return {"data": {"prompt": prompt, "items": [{"id": f"response_{i}", "body": b, "ended": True}
                                                 for i, b in enumerate(bodies, 1)]}}


def test_verifier_pairs_prefer_each_right_answer_to_each_wrong_one():
    export = [_task(SUM, "9.", "Liam has 11 pencils now.", "Liam has 9 pencils now.", "2 + 7 = 10."),
              _task(SUM, "9.", "Nine."),            # all right: no pair
              _task("What is the capital of France?", "Paris.", "Rome.")]  # no question of the task: skipped
    pairs = verifier_pairs(export)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("9.", "Liam has 11 pencils now."), ("9.", "2 + 7 = 10."),
        ("Liam has 9 pencils now.", "Liam has 11 pencils now."), ("Liam has 9 pencils now.", "2 + 7 = 10.")]
    assert {p["prompt"] for p in pairs} == {SUM} and {p["source"] for p in pairs} == {"verifier"}


def test_lever_files_keep_the_held_out_prompts_out_of_training(tmp_path):
    from align.data.common import split_by_prompt
    from align.demo.tasks.short_answers import correctness_pairs
    questions = [p["prompt"] for p in correctness_pairs("rm", 60)[::2]]
    rankings = [{"prompt": q, "chosen": "a.", "rejected": "b c d e."} for q in questions]
    data = tmp_path / "data"
    data.mkdir()
    (data / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    (data / "label_studio_export.json").write_text(json.dumps([_task(q, "x.", "y.") for q in questions]))
    assert main([str(data), "--out", str(tmp_path / "out"), "--n", "60", "--eval-fraction", "0.3"]) == 0
    train, held = split_by_prompt(rankings, 0.3)
    assert held and train
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    assert read("rankings_heldout.jsonl") == held and read("rankings_train.jsonl") == train
    held_prompts = {r["prompt"] for r in held}
    synthetic = read("rankings_synthetic.jsonl")
    assert synthetic[:len(train)] == train and len(synthetic) > len(train)
    assert not {r["prompt"] for r in synthetic} & held_prompts
    assert read("rankings_verifier.jsonl")[:len(train)] == train


def test_more_rankings_add_only_prompts_not_ranked_and_not_held_out(tmp_path):
    """--more: a larger annotation round (the same questions as a prefix) adds its rankings on the
    new prompts; the ones this pipeline ranked and the hash split's held-out prompts stay out."""
    from align.data.common import split_by_prompt
    from align.demo.tasks.short_answers import prompts
    qs = prompts("rm", 80)
    rank = lambda q, tag: {"prompt": q, "chosen": f"{tag} a.", "rejected": "b c d e."}  # noqa: E731
    small, large = tmp_path / "small", tmp_path / "large"
    for d, n, tag in ((small, 30, "first"), (large, 80, "second")):
        d.mkdir()
        (d / "rankings.jsonl").write_text("".join(json.dumps(rank(q, tag)) + "\n" for q in qs[:n]))
        (d / "label_studio_export.json").write_text("[]")
    assert main([str(small), "--out", str(tmp_path / "out"), "--n", "4", "--eval-fraction", "0.3",
                 "--more", str(large)]) == 0
    read = lambda name: [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]  # noqa: E731
    train, held = split_by_prompt([rank(q, "first") for q in qs[:30]], 0.3)
    more = read("rankings_more.jsonl")
    assert more[:len(train)] == train
    added = more[len(train):]
    _, held_large = split_by_prompt([rank(q, "second") for q in qs], 0.3)
    want = [q for q in qs[30:] if q not in {r["prompt"] for r in held_large}]
    assert [r["prompt"] for r in added] == want and want
    assert all(r["chosen"] == "second a." for r in added)
    assert not {r["prompt"] for r in more} & {r["prompt"] for r in held}
