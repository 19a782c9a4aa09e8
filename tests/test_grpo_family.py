"""The GRPO family's options beyond GRPO itself: BNPO's per-micro-batch token mean, DAPO's soft
overlong penalty and dynamic sampling, each against a hand computation, on the toy bandit, and
through kill-and-resume."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

import tests.ppo_helpers as H
from align.rl.group import grpo_loss, overlong_penalty
from align.stages import grpo, online
from tests.test_grpo import LORA_HEAD, cfg, metrics


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([4, 6, 7, 8, 10])
    # max 10 tokens, buffer 4: free up to 6, then -1/4 per token, -1 at 10
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, factor=2.0), torch.tensor([0.0, 0.0, -0.5, -1.0, -2.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 0)


def test_bnpo_is_the_token_mean_of_its_own_chunk_and_dapo_of_the_minibatch():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    # at ratio 1 each token's loss is -A: tokens (-1, -1, -1) and (2): sum -1 over 4 tokens
    loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, 0.2, 0.0, loss_type="bnpo", denominator=10.0)
    assert float(loss.detach()) == pytest.approx(-1.0 / 4)   # bnpo ignores the minibatch's denominator
    loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, 0.2, 0.0, loss_type="dapo", denominator=10.0)
    assert float(loss.detach()) == pytest.approx(-1.0 / 10)
    loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, 0.2, 0.0, loss_type="grpo")
    assert float(loss.detach()) == pytest.approx((-1.0 + 2.0) / 2)   # each response's token mean, then the mean


def _ro(scores, q_width, r_width, lengths):
    b = len(scores)
    resp_mask = torch.arange(r_width)[None, :] < torch.tensor(lengths)[:, None]
    lp = torch.where(resp_mask, -1.0, 0.0)   # a rollout's log-probs are 0 on pads
    return online.Rollout(
        query=torch.full((b, q_width), 7), query_mask=torch.ones(b, q_width, dtype=torch.bool),
        response=torch.where(resp_mask, 5, 0), response_mask=resp_mask, seq_lengths=torch.tensor(lengths) - 1,
        has_stop=torch.ones(b, dtype=torch.bool), logprobs=lp, ref_logprobs=lp.clone(), values=torch.zeros(b, r_width),
        raw_scores=torch.tensor(scores), scores=torch.tensor(scores), sample_logprobs=lp.clone(),
        reward_parts=torch.tensor(scores)[:, None])


def test_concat_groups_pads_prompts_left_and_responses_right():
    a = _ro([1.0, 2.0, 3.0, 3.0], q_width=2, r_width=3, lengths=[3, 1, 2, 2])
    b = _ro([4.0, 5.0], q_width=4, r_width=5, lengths=[5, 4])
    out = online.concat_groups([(a, torch.tensor([0])), (b, torch.tensor([0]))], 2, pad_id=0)
    assert out.query.shape == (4, 4) and out.response.shape == (4, 5)
    assert out.query_mask[:2].tolist() == [[False, False, True, True]] * 2 and out.query_mask[2:].all()
    assert out.response_mask.sum(1).tolist() == [3, 1, 5, 4]
    assert out.scores.tolist() == [1.0, 2.0, 4.0, 5.0]
    assert (out.logprobs[~out.response_mask] == 0).all() and (out.logprobs[out.response_mask] == -1).all()
    assert (out.response[~out.response_mask] == 0).all()


def test_dynamic_sampling_replaces_groups_without_an_advantage(tiny_llama, tmp_path):
    """A reward that gives every response to a 'happy dog' prompt the same score: those groups are
    dropped and refilled from further prompts, so every trained group has a spread of scores."""
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts,
                 "reward_fn=tests.ppo_helpers:count_target_except_happy", "grpo.iterations=3",
                 "grpo.rollout_batch_size=16", "grpo.response_length=8", "grpo.dynamic_sampling=true",
                 "grpo.dynamic_sampling_rounds=4", "grpo.overlong_buffer=4", "grpo.missing_stop_mode=none"))
    m = [x for x in metrics(tmp_path / "run") if "objective/scores" in x]
    assert sum(x["dynamic_sampling/dropped_groups"] for x in m) >= 1        # some happy-dog groups were drawn
    assert sum(x["dynamic_sampling/rounds"] for x in m) >= 1
    assert all(x["dynamic_sampling/filled_uninformative"] == 0 for x in m)
    assert all(x["objective/overlong_penalty"] <= 0 for x in m)


def test_dynamic_sampling_fills_with_dropped_groups_when_the_rounds_run_out(tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the happy dog"] * 8)   # every group uninformative
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts,
                 "reward_fn=tests.ppo_helpers:count_target_except_happy", "grpo.iterations=1",
                 "grpo.rollout_batch_size=16", "grpo.response_length=4", "grpo.dynamic_sampling=true",
                 "grpo.dynamic_sampling_rounds=2", "grpo.missing_stop_mode=none"))
    m = [x for x in metrics(tmp_path / "run") if "objective/scores" in x][0]
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/filled_uninformative"] == 4
    assert m["objective/advantage_abs"] == 0.0


def test_dapo_options_resume_exactly(tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    common = ["reward_fn=tests.ppo_helpers:count_target_except_happy", "grpo.iterations=4", "grpo.response_length=6",
              "grpo.save_every=1", "grpo.rollout_batch_size=16", "grpo.loss_type=dapo", "grpo.cliprange_high=0.28",
              "grpo.dynamic_sampling=true", "grpo.overlong_buffer=2"]
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, *common, name="full"))
    assert grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, *common, "grpo.stop_after_iterations=2",
                        name="killed")) == {"stopped_at": 2}
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, *common, "resume=true", name="killed"))
    a = load_file(tmp_path / "full" / "adapters" / "policy" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapters" / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [
    ("grpo.loss_type=dapo", "grpo.cliprange_high=0.28", "grpo.dynamic_sampling=true", "grpo.overlong_buffer=3"),
    ("grpo.loss_type=bnpo", "grpo.ratio_level=sequence"),
])
def test_toy_reward_rises_under_each_loss(tiny_llama, tmp_path, extra):
    """The bandit of tests/test_grpo.py (count the letter 'e', beta 0.5) under DAPO's options and
    under BNPO with GSPO's sequence ratio: the score rises, the KL stays bounded. Measured: KL at
    most 7.2 (dapo, clip-higher) and 6.0 (bnpo); without the KL term it reaches 25-39, so the bound
    of 12 fails if the term is lost."""
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, "reward_fn=tests.ppo_helpers:count_target",
                 "grpo.iterations=25", "grpo.rollout_batch_size=64", "grpo.group_size=8", "grpo.micro_batch_size=32",
                 "grpo.response_length=8", "grpo.lr=3e-2", "grpo.num_epochs=2", "grpo.missing_stop_mode=none",
                 "grpo.kl_coef=0.5", *extra))
    m = [x for x in metrics(tmp_path / "run") if "objective/scores" in x]
    early = sum(x["objective/scores"] for x in m[:3]) / 3
    late = sum(x["objective/scores"] for x in m[-3:]) / 3
    assert late > early + 0.5, (extra, early, late)
    assert max(x["objective/kl"] for x in m) < 12.0
