"""Several reward sources with weights (align/rewardmix.py): the learned reward role and any number
of programmatic functions in one ``rewards`` list, each checked and logged on its own."""
from __future__ import annotations

import pytest
import torch

import tests.ppo_helpers as H
from align.config import ConfigError, load_config
from align.rewardmix import RewardMix, RewardSource
from align.stages import grpo
from tests.test_grpo import cfg, metrics


def test_the_score_is_the_weighted_sum_over_the_sources_with_an_opinion():
    mix = RewardMix([RewardSource("rm", 0.5), RewardSource("verifier", 2.0, fn=H.picky)],
                    {"mean": 1.0, "std": 2.0}, normalize=True)
    prompts = [{"text": t, "columns": {}} for t in ("a dog", "a cat", "a dog")]
    parts = mix.parts(prompts, ["yes", "yes", "no"], [True] * 3, torch.tensor([3.0, 5.0, 1.0]), 1, "cpu")
    assert torch.isnan(parts[1, 1]) and not torch.isnan(parts).any(1)[[0, 2]].any()
    # learned: normalised (r - 1) / 2 -> 1, 2, 0; verifier: 1, no opinion, 0
    torch.testing.assert_close(mix.combine(parts), torch.tensor([0.5 * 1 + 2 * 1, 0.5 * 2, 0.0]))
    torch.testing.assert_close(mix.combine(parts, normalised=False), torch.tensor([1.5 + 2.0, 2.5, 0.5]))
    m = mix.metrics(parts)
    assert m["reward/verifier/mean"] == pytest.approx(0.5) and m["reward/verifier/none_rate"] == pytest.approx(1 / 3)
    assert m["reward/rm/mean"] == pytest.approx(3.0) and m["reward/rm/none_rate"] == 0.0


@pytest.mark.parametrize("overrides,match", [
    (["reward_fn=tests.ppo_helpers:count_target", "rewards=[{fn: tests.ppo_helpers:picky}]"], "not both"),
    (["rewards=[{role: reward}]"], "needs reward_run"),
    (["rewards=[{fn: tests.ppo_helpers:picky, role: reward}]"], "give {fn: module:function} \\(or a built-in verifier's name\\) or {role: reward}"),
    (["rewards=[{fn: tests.ppo_helpers:picky, weight: many}]"], "weight='many': give a finite number"),
    (["rewards=[{fn: tests.ppo_helpers:two_args}]"], r"rewards\[0\].fn=.*cannot be called"),
    (["rewards=[{fn: tests.ppo_helpers:picky}]", "reward_run=RM"], "has no {role: reward} entry"),
])
def test_a_bad_rewards_list_is_refused_before_anything_is_written(tiny_llama, tmp_path, overrides, match):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the happy dog"] * 8)
    overrides = [o.replace("RM", str(rm)) for o in overrides]
    with pytest.raises(ConfigError, match=match):
        grpo.run(load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path / 'g'}", f"sft_run={sft}",
                                                     f"data.prompts={prompts}", "tracking.wandb=false",
                                                     "grpo.rollout_batch_size=8", *overrides]))
    assert not (tmp_path / "g").exists()


def test_a_learned_reward_and_a_verifier_mixed_are_each_logged_and_summed_with_their_weights(tiny_llama, tmp_path, capsys):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} {a}" for w in "happy sad quick lazy".split()
                                                     for a in ("dog", "cat")] * 2)
    grpo.run(cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, f"reward_run={rm}",
                 "rewards=[{role: reward, weight: 0.5}, {fn: tests.ppo_helpers:picky, weight: 2.0, name: dogs}]",
                 "grpo.iterations=2", "grpo.response_length=4", "grpo.normalize_reward=false",
                 "grpo.missing_stop_mode=none"))
    assert "[grpo] warning: the learned reward is mixed with other rewards" in capsys.readouterr().out
    rows = [m for m in metrics(tmp_path / "run") if "objective/raw_scores" in m]
    assert len(rows) == 2
    for m in rows:
        assert 0 < m["reward/dogs/none_rate"] < 1          # cats: no opinion
        with_opinion = 1 - m["reward/dogs/none_rate"]
        expected = 0.5 * m["reward/reward_model/mean"] + 2.0 * m["reward/dogs/mean"] * with_opinion
        assert m["objective/raw_scores"] == pytest.approx(expected, abs=1e-5)
        assert m["objective/scores"] == pytest.approx(expected, abs=1e-5)   # no normalisation, no stop penalty


def test_a_prompt_without_the_column_a_reward_requires_is_refused_before_the_run_dir(tiny_llama, tmp_path):
    import json
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the dog {i}", **({"answer": "e"} if i != 5 else {})}) + "\n")
    with pytest.raises(ConfigError, match=r"p.jsonl: line 6: no field 'answer', which reward_fn "
                                          r"tests.ppo_helpers:answer_reward requires \(data.prompts\)"):
        grpo.run(load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path / 'g'}", f"sft_run={sft}",
                                                     f"data.prompts={tmp_path / 'p.jsonl'}", "tracking.wandb=false",
                                                     "grpo.rollout_batch_size=8",
                                                     "reward_fn=tests.ppo_helpers:answer_reward"]))
    assert not (tmp_path / "g").exists()
