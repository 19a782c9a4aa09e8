"""Reward model: InstructGPT K-wise loss, last-token reading, prompt-level split, learning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align.data.common import split_by_prompt
from align.data.preferences import Group, collate_groups, to_group, tokenize_group
from align.rl.losses import kwise_loss
from align.scoring import sequence_rewards
from tests.conftest import load


def test_kwise_loss_matches_hand_computation_for_three_completions():
    # one prompt, K=3, ranks: c0 best, c2 middle, c1 worst -> pairs (0,2), (0,1), (2,1)
    r = torch.tensor([1.0, -0.5, 0.2])
    loss, stats = kwise_loss(r, torch.tensor([0.0, 2.0, 1.0]), torch.zeros(3, dtype=torch.long), 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = -(math.log(sig(1.0 - 0.2)) + math.log(sig(1.0 + 0.5)) + math.log(sig(0.2 + 0.5))) / 3
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert stats["pairs"] == 3 and stats["accuracy"] == 1.0


def test_kwise_equals_pairwise_when_k_is_two_and_groups_weigh_as_one_unit():
    rc, rr = torch.tensor([0.3, 1.2]), torch.tensor([-0.1, 1.5])
    pairwise = -F.logsigmoid(rc - rr).mean()
    r = torch.stack([rc, rr], 1).reshape(-1)     # [c0, r0, c1, r1]
    group = torch.tensor([0, 0, 1, 1])
    ranks = torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss, _ = kwise_loss(r, ranks, group, 2)
    assert loss.item() == pytest.approx(pairwise.item(), abs=1e-6)
    # a K=4 group (6 pairs) next to a K=2 group (1 pair): each group counts once
    r2 = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 0.0])
    g2 = torch.tensor([0, 0, 0, 0, 1, 1])
    loss2, stats = kwise_loss(r2, torch.tensor([0.0, 1, 2, 3, 0, 1]), g2, 2)
    d4 = torch.tensor([1.0, 2, 3, 1, 2, 1])
    want = 0.5 * (-F.logsigmoid(d4).mean() - F.logsigmoid(torch.tensor(0.5)))
    assert loss2.item() == pytest.approx(want.item(), abs=1e-6) and stats["pairs"] == 7


def test_ties_are_skipped_or_half_and_margin_shifts_the_pair():
    r = torch.tensor([1.0, 1.0, 0.0])
    ranks = torch.tensor([0.0, 0.0, 1.0])
    g = torch.zeros(3, dtype=torch.long)
    skip, st = kwise_loss(r, ranks, g, 1, ties="skip")
    assert st["pairs"] == 2
    assert skip.item() == pytest.approx(-F.logsigmoid(torch.tensor(1.0)).item(), abs=1e-6)
    half, _ = kwise_loss(r, ranks, g, 1, ties="half")
    want = (2 * -F.logsigmoid(torch.tensor(1.0)) + math.log(2)) / 3
    assert half.item() == pytest.approx(want.item(), abs=1e-6)
    m, _ = kwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long), 1,
                      margin=torch.tensor([0.5]))
    assert m.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.5)).item(), abs=1e-6)


def test_record_forms_become_groups():
    assert to_group({"prompt": "p", "chosen": " a", "rejected": " b"}, "x").ranks == [0, 1]
    g = to_group({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "x")
    assert g.prompt == "The sky is" and g.completions == [" blue.", " green."]
    conv = to_group({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "x")
    assert conv.prompt == [{"role": "user", "content": "q"}]
    k = to_group({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 0, 1]}, "x")
    assert k.ranks == [1, 0, 1]
    with pytest.raises(ValueError, match="file.jsonl: record 3: missing field 'rejected'"):
        to_group({"prompt": "p", "chosen": "a"}, "file.jsonl: record 3")


def test_preference_weight_zero_stays_zero_and_bad_weights_are_refused():
    """Issue 16: ``weight: 0`` used to become 1 (``float(w or 1.0)``)."""
    pair = {"prompt": "p", "chosen": " a", "rejected": " b"}
    assert to_group({**pair, "weight": 0}, "x").weight == 0.0
    assert to_group({**pair, "weight": 0.0}, "x").weight == 0.0
    assert to_group({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1], "weight": 0}, "x").weight == 0.0
    assert to_group(pair, "x").weight == 1.0 and to_group({**pair, "weight": None}, "x").weight == 1.0
    assert to_group({**pair, "weight": 2.5}, "x").weight == 2.5
    # a zero-weight group adds nothing to the loss
    r = torch.tensor([3.0, -1.0, 0.0, 1.0])
    ranks, group = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    loss, _ = kwise_loss(r, ranks, group, 2, weight=torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(-1.0)).item() / 2, abs=1e-6)
    for bad in (-1, -0.5, float("nan"), float("inf"), "heavy", True):
        with pytest.raises(ValueError, match=r"prefs.jsonl: record 7: field 'weight' must be a finite number >= 0"):
            to_group({**pair, "weight": bad}, "prefs.jsonl: record 7")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_reads_the_last_real_token_under_left_and_right_padding(tiny_paths, family):
    model, tok = load(tiny_paths[family])
    model.add_adapter("reward", __import__("align.adapters", fromlist=["AdapterConfig"]).AdapterConfig(r=2))
    model.add_head("reward")
    model.add_role("reward", ["reward"], head="reward")
    group = tokenize_group(Group("the happy dog", [" sings a good song", " bad"], [0, 1]), tok, 64)
    alone = []
    with model.use("reward"):
        for s in group.sequences:
            ids = torch.tensor([s])
            alone.append(model(ids, torch.ones_like(ids)).values[0, -1])
        for side in ("left", "right"):
            b = collate_groups([group], tok.pad_token_id, padding_side=side)
            assert (b["attention_mask"] == 0).any()  # the batch really is padded
            r = sequence_rewards(model(b["input_ids"], b["attention_mask"]).values, b["attention_mask"])
            torch.testing.assert_close(r, torch.stack(alone), atol=1e-5, rtol=0)


def test_prompt_level_split_leaks_no_prompt():
    recs = [{"prompt": f"prompt {i % 50}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(500)]
    train, held = split_by_prompt(recs, 0.2)
    assert len(train) + len(held) == 500 and 0 < len(held) < 250
    assert not ({r["prompt"] for r in train} & {r["prompt"] for r in held})


def test_implicit_prompt_pairs_sharing_a_conversation_land_on_one_side():
    """Issue 16: the split hashed all of 'chosen' for {chosen, rejected} pairs, so pairs of one
    conversation fell on both sides. It hashes the shared prompt now (HH-RLHF strings and
    conversational message lists)."""
    from align.data.common import prompt_key
    replies = [" Sure, here it is.", " Sure, here is another.", " No.", " Sure thing!", " I can't help with that.",
               " Maybe later.", " Here you go.", " Here you go, with more."]
    recs = []
    for i in range(60):
        convo = f"\n\nHuman: question {i}?\n\nAssistant: An answer {i}.\n\nHuman: and then?\n\nAssistant:"
        for k in range(len(replies) - 1):          # replies that share first words with others too
            recs.append({"chosen": convo + replies[k], "rejected": convo + replies[k + 1], "conv": i})
        msgs = [{"role": "user", "content": f"chat {i}"}]
        for k in range(3):
            recs.append({"chosen": msgs + [{"role": "assistant", "content": replies[k]}],
                         "rejected": msgs + [{"role": "assistant", "content": replies[k + 1]}], "conv": 1000 + i})
    train, held = split_by_prompt(recs, 0.3)
    assert train and held
    assert not ({r["conv"] for r in train} & {r["conv"] for r in held})
    # the key is the shared prompt, as an explicit-prompt record of that prompt would have it
    hh = recs[0]
    assert prompt_key(hh) == prompt_key({"prompt": hh["chosen"][:-len(replies[0])], "chosen": "", "rejected": ""})


def test_reward_refuses_an_empty_configured_eval_split(tiny_llama, tmp_path):
    """Issue 16: a configured eval split that holds nothing is refused before the run starts."""
    import align.stages.reward as reward
    from align.config import ConfigError, load_config
    data = rule_rankings(tmp_path / "rules.jsonl", n=20)
    with pytest.raises(ConfigError, match=r"data.eval_fraction=0.0001 holds out no eval records from .*rules.jsonl"):
        reward.run(load_config(reward.RewardConfig, None, [
            f"output_dir={tmp_path / 'rm'}", f"model.path={tiny_llama}", f"data.train={data}", "init=base",
            "data.eval_fraction=0.0001", "tracking.wandb=false"]))
    assert not (tmp_path / "rm").exists()


def rule_rankings(path, n=240, seed=0):
    """K=3 rankings by a known rule: more positive words rank higher (ties none). Held-out prompts
    (split by prompt) and completions recombined from the same words, so only the rule carries over."""
    import json
    import random
    rng = random.Random(seed)
    pos, neg, neutral = ["happy", "great", "lovely", "bright"], ["sad", "awful", "dull", "grim"], ["dog", "song", "day", "film"]
    with open(path, "w") as f:
        for i in range(n):
            comps, scores = [], []
            for k in range(3):
                p = k  # 0, 1 or 2 positive words, the rest negative
                words = rng.sample(pos, p) + rng.sample(neg, 2 - p) + [rng.choice(neutral)]
                rng.shuffle(words)
                comps.append(" " + " ".join(words))
                scores.append(p)
            order = list(range(3))
            rng.shuffle(order)
            f.write(json.dumps({"prompt": f"review {i}:", "completions": [comps[j] for j in order],
                                "ranks": [2 - scores[j] for j in order]}) + "\n")
    return path


def test_reward_model_learns_a_known_rule_well_above_chance(tiny_llama, tmp_path):
    """Held-out pairwise accuracy on prompts never trained on (chance: 0.5)."""
    import json

    import align.stages.reward as reward
    from align.config import load_config
    from tests.ppo_helpers import fake_sft_run
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    data = rule_rankings(tmp_path / "rules.jsonl")
    out = reward.run(load_config(reward.RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"sft_run={sft}", f"data.train={data}", "data.eval_fraction=0.2",
        "train.batch_size=8", "train.epochs=3", "train.lr=1e-2", "train.eval_every=30", "tracking.wandb=false",
        "normalize.num_prompts=8", "normalize.max_new_tokens=4"]))
    evals = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in x]
    assert evals[0]["step"] == 0 and 0.25 < evals[0]["eval/accuracy"] < 0.75   # untrained: about chance
    assert out["eval/accuracy"] >= 0.9, evals
    assert out["eval/pairs"] >= 100 and out["eval/margin"] > 0
    norm = out["normalisation"]
    assert norm["n"] == 8 and norm["std"] > 0
