"""The quickstart task: gold scorer, generators, simulated annotator, its import, backbone cache."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics

import pytest

from align.demo.tasks import quickstart as task
from align.demo.annotator import plackett_luce_order, simulate_label_studio_ranker, write_export

g = task.gold_score


# ------------------------------------------------------------------------------- gold scorer
def test_gold_scorer_exact_values():
    # P = 2 distinct positive words, N = 0
    assert g("Review of The Lost Road:", " The plot was great and the cast felt lovely.", True) == math.tanh(1.2)
    # P = 1, N = 2: "Boring" counts however it is capitalised
    assert g("", " Boring. The soup was bad but the bread was great.", True) == math.tanh(-0.6)
    assert g("", " The room was quiet.", True) == 0.0
    # one positive word four times: counted once; the two uses beyond the second cost 0.15 each
    assert g("", " great great great great", True) == pytest.approx(math.tanh(0.6) - 0.3)
    # the same clause three times: "food" and "great" are each repeated once too often
    assert g("", " The food was great. The food was great. The food was great.", True) == pytest.approx(
        math.tanh(0.6) - 0.3)
    assert g("", " The food was great.", False) == pytest.approx(math.tanh(0.6) - 1.0)   # never stopped
    assert g("", " Great.", True) == pytest.approx(math.tanh(0.6) - 0.5)                # too short
    assert g("", "", True) == -0.5
    # stop words may repeat freely
    assert g("", " The food was good, the room was plain, the view was dull and the bed was bad.", True) == \
        math.tanh(-0.6)


def test_gold_scorer_orders_hand_written_examples():
    pos, neu, neg = (g("", t, True) for t in (" The soup was superb.", " The soup was plain.", " The soup was awful."))
    assert pos > neu > neg
    varied = g("", " The plot was brilliant and the cast was superb. The ending felt perfect.", True)
    assert varied > pos > 0
    assert varied > g("", " The plot was brilliant and the cast was brilliant. The ending felt brilliant.", True)
    assert g("", " The soup was superb.", False) < neu          # not ending outweighs sentiment
    assert task.gold_scores(["a", "b"], [" The soup was superb.", " The soup was awful."], [True, True]) == [pos, neg]
    with pytest.raises(ValueError):
        task.gold_scores(["a"], [], [True])


# -------------------------------------------------------------------------------- generators
def test_generators_are_deterministic_for_a_seed():
    assert task.sft_demonstrations(50, 3) == task.sft_demonstrations(50, 3)
    assert task.sft_demonstrations(50, 3) != task.sft_demonstrations(50, 4)
    assert task.pretrain_corpus(50, 1) == task.pretrain_corpus(50, 1)
    for split in task.SPLITS:
        assert task.prompts(split, 50, 1) == task.prompts(split, 50, 1)
    assert task.prompts("ppo", 50, 1) != task.prompts("rm", 50, 1)
    with pytest.raises(ValueError):
        task.prompts("test", 5, 0)


def test_eval_prompts_are_held_out():
    held = set(task.prompts("eval", 500, 0))
    train = {p for s in ("sft", "rm", "ppo") for seed in (0, 1) for p in task.prompts(s, 2000, seed)}
    train |= {d["prompt"] for d in task.sft_demonstrations(2000, 0)}
    assert not held & train
    held_words = set(task.HELD_OUT_TITLE_ADJ) | set(task.HELD_OUT_PLACE_ADJ)
    assert all(set(p.rstrip(":").split()) & held_words for p in held)
    assert not any(set(p.rstrip(":").split()) & held_words for p in train)
    assert len(held) >= 100                        # enough distinct held-out prompts to evaluate on


def test_sft_demonstrations_are_mixed_and_well_formed():
    demos = task.sft_demonstrations(2000, 0)
    for d in demos:
        assert set(d) == {"prompt", "completion"} and d["prompt"].endswith(":")
        assert d["completion"].startswith(" ") and "<|" not in d["completion"]
        assert 4 <= len(d["completion"].split()) <= 25
    golds = [g(d["prompt"], d["completion"], True) for d in demos]
    assert abs(statistics.mean(golds)) < 0.05      # about neutral: PPO has room to improve
    assert 0.4 < statistics.pstdev(golds) < 0.8    # but spread out: rankings carry signal
    assert max(golds) > 0.9 and min(golds) < -0.9


# ----------------------------------------------------------------------------------- annotator
def _agreement(beta: float, n: int = 600, seed: int = 0) -> tuple[float, float]:
    """Share of response pairs the annotator orders as gold does, and the Bradley-Terry prediction."""
    demos = task.sft_demonstrations(4 * n, seed)
    responses = [[d["completion"] for d in demos[4 * i:4 * i + 4]] for i in range(n)]
    prompts = [demos[4 * i]["prompt"] for i in range(n)]
    tasks = simulate_label_studio_ranker(prompts, responses, [[True] * 4] * n, gold_fn=g, beta=beta, seed=seed)
    agree = total = 0
    expected = 0.0
    for t, resp in zip(tasks, responses):
        order = t["annotations"][0]["result"][0]["value"]["ranker"]["rank"]
        pos = {item: i for i, item in enumerate(order)}
        gold = [g("", r, True) for r in resp]
        for a in range(4):
            for b in range(a + 1, 4):
                if abs(gold[a] - gold[b]) < 1e-9:
                    continue
                hi, lo = (a, b) if gold[a] > gold[b] else (b, a)
                agree += pos[f"response_{hi + 1}"] < pos[f"response_{lo + 1}"]
                total += 1
                expected += 1 / (1 + math.exp(-(gold[hi] - gold[lo]) / beta)) if beta else 1.0
    return agree / total, expected / total


def test_annotator_follows_gold_as_beta_shrinks_and_is_random_as_it_grows():
    sharp, _ = _agreement(0.01)
    noisy, _ = _agreement(100.0)
    mid, predicted = _agreement(0.5)
    print(f"agreement with gold: beta=0.01 {sharp:.3f}, 0.5 {mid:.3f} (BT {predicted:.3f}), 100 {noisy:.3f}")
    assert sharp > 0.99
    assert abs(noisy - 0.5) < 0.04
    assert 0.6 < mid < 0.95 and abs(mid - predicted) < 0.03    # pairwise marginals are Bradley-Terry
    assert _agreement(0.0)[0] == 1.0


def test_plackett_luce_first_choice_probabilities():
    import random
    rng = random.Random(0)
    gold, beta, n = [1.0, 0.0, -1.0], 1.0, 20000
    firsts = [plackett_luce_order(gold, beta, rng)[0] for _ in range(n)]
    z = sum(math.exp(x / beta) for x in gold)
    for i, x in enumerate(gold):
        assert abs(firsts.count(i) / n - math.exp(x / beta) / z) < 0.015


def _export(n=3, annotators=1, seed=0):
    prompts = task.prompts("rm", n, 0)
    responses = [[" The food was great.", " The food was bad and the staff was rude.", " The food was"]] * n
    ended = [[True, True, False]] * n
    return simulate_label_studio_ranker(prompts, responses, ended, gold_fn=g, beta=0.05, seed=seed,
                                        annotators=annotators)


def test_export_has_the_label_studio_ranker_layout(tmp_path):
    tasks = _export(annotators=2)
    assert tasks == _export(annotators=2)                         # deterministic for a seed
    path = write_export(tasks, tmp_path / "sub" / "export.json")
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, list) and loaded == tasks           # a JSON array of tasks
    for t in loaded:
        # §7a task fields; §7c data of the LLM Ranker template
        assert {"id", "data", "annotations", "drafts", "predictions", "meta"} <= set(t)
        assert set(t["data"]) == {"prompt", "items"} and isinstance(t["data"]["prompt"], str)
        ids = [it["id"] for it in t["data"]["items"]]
        assert len(set(ids)) == 3 and all({"id", "title", "body"} <= set(it) for it in t["data"]["items"])
        assert [a["completed_by"] for a in t["annotations"]] == [1, 2]
        for a in t["annotations"]:
            assert {"id", "completed_by", "result", "was_cancelled", "ground_truth", "lead_time"} <= set(a)
            assert a["was_cancelled"] is False and len(a["result"]) == 1
            r = a["result"][0]
            assert {k: r[k] for k in ("from_name", "to_name", "type", "origin")} == {
                "from_name": "rank", "to_name": "answers", "type": "ranker", "origin": "manual"}
            assert isinstance(r["id"], str) and len(r["id"]) == 10
            assert list(r["value"]) == ["ranker"] and list(r["value"]["ranker"]) == ["rank"]  # rank mode
            assert sorted(r["value"]["ranker"]["rank"]) == sorted(ids)
            # beta = 0.05: the ranking follows gold (positive, negative, unfinished)
            assert r["value"]["ranker"]["rank"] == ["response_1", "response_2", "response_3"]
    assert "gold" not in json.dumps(loaded)                       # the scorer stays hidden
    with pytest.raises(ValueError):
        simulate_label_studio_ranker(["p"], [["a", "b"]], [[True]], gold_fn=g, beta=1.0, seed=0)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:                   # the parent package is missing too
        return False


@pytest.mark.skipif(not _has_module("data_tools.label_studio"),
                    reason="the Label Studio importer (data_tools/label_studio.py) is not in this checkout yet")
def test_export_goes_through_the_label_studio_importer(tmp_path):
    from data_tools.cli import main
    n = 40
    prompts = task.prompts("rm", n, 0)
    demos = task.sft_demonstrations(4 * n, 1)
    responses = [[d["completion"] for d in demos[4 * i:4 * i + 4]] for i in range(n)]
    ended = [[True, True, True, i % 5 != 0] for i in range(n)]
    tasks = simulate_label_studio_ranker(prompts, responses, ended, gold_fn=g, beta=0.3, seed=0)
    path = write_export(tasks, tmp_path / "export.json")
    out = tmp_path / "rankings.jsonl"
    assert main(["label-studio", str(path), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == n
    by_prompt = {}
    for t in tasks:
        order = t["annotations"][0]["result"][0]["value"]["ranker"]["rank"]
        body = {it["id"]: it["body"] for it in t["data"]["items"]}
        by_prompt.setdefault(t["data"]["prompt"], []).append([body[i] for i in order])
    for rec in recs:
        assert rec["source"] == "label-studio"
        ranked = [c for _, c in sorted(zip(rec["ranks"], rec["completions"]))]
        assert ranked in by_prompt[rec["prompt"]]                # the ranking came back, best first


# ------------------------------------------------------------------------------------ backbone
def test_ensure_backbone_trains_once_and_caches(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.demo import pretrain
    kw = dict(vocab_size=400, hidden=32, layers=1, heads=2, steps=3, batch_size=4, seq_len=32, n_docs=300)
    path = pretrain.ensure_backbone(tmp_path, **kw)
    assert path.parent == tmp_path and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    info = json.loads((path / "pretrain.json").read_text())
    assert info["steps"] == 3 and math.isfinite(info["final_loss"]) and info["seconds"] >= 0
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert tok.pad_token_id != tok.eos_token_id and model.config.eos_token_id == tok.eos_token_id
    assert info["params"] == sum(p.numel() for p in model.parameters())

    def no_training(*a, **k):
        raise AssertionError("retrained although a cached backbone exists")
    monkeypatch.setattr(pretrain, "train_tokenizer", no_training)
    assert pretrain.ensure_backbone(tmp_path, **kw) == path
    with pytest.raises(AssertionError, match="retrained"):
        pretrain.ensure_backbone(tmp_path, **{**kw, "steps": 4})   # other settings: another backbone


# ------------------------------------------------------------------------------------- report
@pytest.mark.parametrize("controller", ["fixed", "adaptive"])
def test_report_kl_row_says_what_the_number_is_for_each_controller(tmp_path, controller):
    """Issue 16: the report printed "KL (target 6.0)" also under the fixed controller, which has no
    target. The row names the quantity and the controller setting actually used."""
    from align.demo.pipeline import PipelineConfig, PolicySpec
    from align.demo.report import kl_label, write_report
    cfg = PipelineConfig(policy=PolicySpec(kl_controller=controller, kl_coef=0.05, kl_target=6.0))
    side = {"gold_mean": 0.1, "gold_sem": 0.01, "reward_mean": 0.2, "kl_to_sft_mean": 2.5, "stop_rate": 1.0}
    comparison = {"a": side, "b": side, "gold_diff_mean": 0.0, "gold_diff_sem": 0.01, "win_rate_b_by_gold": 0.5,
                  "win_rate_b_by_reward": 0.5, "n_prompts": 8, "samples": []}
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "summary.json").write_text(json.dumps({"trainable_params": 10, "backbone_params": 1000}))
    report = write_report(tmp_path, cfg, comparison, {"rm_accuracy_vs_gold": 0.9, "rm_eval_pairs": 4},
                          {"sft": 1.0}, {"sft": str(tmp_path / "sft"), "policy": str(tmp_path / "ppo")})
    (row,) = [ln for ln in (tmp_path / "report.md").read_text().splitlines() if "KL(PPO ‖ SFT)" in ln]
    assert row == f"| {kl_label(controller, 0.05, 6.0)} | 2.500 |"
    assert report["kl_controller"] == controller and report["kl_coef"] == 0.05
    if controller == "fixed":
        assert row.startswith("| KL(PPO ‖ SFT), nats per response (fixed KL coefficient β 0.05) |")
        assert "target" not in row
    else:
        assert row.startswith("| KL(PPO ‖ SFT), nats per response (adaptive controller target 6, initial β 0.05) |")


def test_annotation_sends_distinct_responses_and_drops_prompts_with_one():
    """A chat model samples the same short answer several times (SmolLM2 at temperature 0.7: 207 of
    256 prompts had a repeat); the importer refuses a ranking with repeated completions, so the
    pipeline lost 80% of its annotations before this. Duplicates are merged before ranking."""
    from align.demo.pipeline import distinct_samples
    p, r, e, skipped = distinct_samples(["a", "b", "c"], [["x", "y", "x", "z"], ["s", "s"], ["u", "v"]],
                                        [[True, False, True, True], [True, True], [False, True]])
    assert p == ["a", "c"] and skipped == 1
    assert r == [["x", "y", "z"], ["u", "v"]] and e == [[True, False, True], [False, True]]
