"""The quickstart task: gold scorer, generators, simulated annotator and its import."""
from __future__ import annotations

import json
import math

from align.quickstart import task
from align.quickstart.annotator import simulate_label_studio_ranker, write_export


def test_gold_scorer_on_hand_written_examples():
    g = task.gold_score
    assert g("", " The food was great and the staff felt lovely.", True) == math.tanh(1.2)
    assert g("", " The food was bad.", True) == math.tanh(-0.6)
    assert g("", " The room was quiet.", True) == 0.0
    # repeating one positive word is worth one word, and repetition beyond twice costs 0.15 each
    assert g("", " great great great great", True) == math.tanh(0.6) - 0.3
    assert g("", " The food was great.", False) == math.tanh(0.6) - 1.0   # never stopped
    pos, neu, neg = (g("", t, True) for t in (" The soup was tasty.", " The soup was hot.", " The soup was cold."))
    assert pos > neu > neg


def test_generators_are_deterministic_and_eval_prompts_are_held_out():
    assert task.sft_demonstrations(20, 3) == task.sft_demonstrations(20, 3)
    assert task.prompts("ppo", 50, 1) == task.prompts("ppo", 50, 1)
    held = set(task.prompts("eval", 300, 0))
    for split in ("sft", "rm", "ppo"):
        assert not held & set(task.prompts(split, 300, 0))
    assert not held & {d["prompt"] for d in task.sft_demonstrations(500, 0)}
    golds = [task.gold_score(d["prompt"], d["completion"], True) for d in task.sft_demonstrations(1000, 0)]
    assert abs(sum(golds) / len(golds)) < 0.2  # demonstrations are mixed: SFT starts near neutral


def _rankings(beta, n=400, seed=0):
    prompts = ["p"] * n
    responses = [[" The food was great and the music felt lovely.", " The food was bad."]] * n
    tasks = simulate_label_studio_ranker(prompts, responses, [[True, True]] * n, gold_fn=task.gold_score,
                                         beta=beta, seed=seed)
    return tasks, sum(t["annotations"][0]["result"][0]["value"]["ranker"]["rank"][0] == "r0" for t in tasks) / n


def test_annotator_follows_gold_as_beta_shrinks_and_is_random_as_it_grows():
    _, sharp = _rankings(0.05)
    _, noisy = _rankings(100.0)
    gap = task.gold_score("", " The food was great and the music felt lovely.", True) - task.gold_score(
        "", " The food was bad.", True)
    assert sharp > 0.99
    assert abs(noisy - 0.5) < 0.08
    _, mid = _rankings(1.0)
    assert abs(mid - 1 / (1 + math.exp(-gap))) < 0.06  # Bradley-Terry for K = 2


def test_export_has_label_studio_ranker_layout_and_imports(tmp_path):
    tasks, _ = _rankings(0.1, n=5)
    t = tasks[0]
    assert set(t["data"]) == {"prompt", "items"} and {"id", "title", "body"} <= set(t["data"]["items"][0])
    res = t["annotations"][0]["result"][0]
    assert res["type"] == "ranker" and res["from_name"] == "rank" and set(res["value"]["ranker"]) == {"rank"}
    path = write_export(tasks, tmp_path / "export.json")
    from data_tools.cli import main
    assert main(["label-studio", str(path), "--out", str(tmp_path / "r.jsonl")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    # five identical tasks deduplicate only if their rankings agree; every one is accounted for
    assert 1 <= len(recs) <= 5 and all(r["source"] == "label-studio" for r in recs)
    first = recs[0]
    order = res["value"]["ranker"]["rank"]
    best = t["data"]["items"][int(order[0][1:])]["body"]
    assert first.get("chosen", best) == best
