"""What each policy-optimisation option optimises (docs/objectives.md), checked exactly.

Gradients are taken of *exact* expectations over small categoricals (every action weighted by its
sampling probability), so an estimator's expected gradient is compared with the gradient of the
divergence it is said to optimise, with no sampling noise. Then the per-record weights, reward
centering, RLOO's sequence-level ratio and the losses' independence of how a batch is cut into
micro-batches and processes.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tests.ppo_helpers as H
from align.config import ConfigError, load_config
from align.rl.group import grpo_kl, grpo_loss, rloo_advantages, rloo_loss
from align.rl.kl import kl_per_token, masked_kl
from align.rl.losses import counts_in_loss, dpo_loss, kwise_loss, plackett_luce_loss
from align.stages import grpo, ppo, rloo
from tests.test_grpo import LORA_HEAD, cfg as group_cfg


def categorical(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    return logits, ref


def grad(f, x):
    return torch.autograd.grad(f, x)[0]


def reverse_kl(logp, ref):  # KL(pi || ref), the RLHF objective's
    return (logp.exp() * (logp - ref)).sum()


def forward_kl(logp, ref):  # KL(ref || pi)
    return (ref.exp() * (ref - logp)).sum()


# ------------------------------------------------------------------------------ PPO: KL in the reward
def reward_penalty_gradient(estimator: str, logits, ref):
    """The policy gradient of the penalty used as a reward: E_pi[grad log pi(a) * k(a)], k a constant."""
    logp = torch.log_softmax(logits, 0)
    k = kl_per_token(logp.detach(), ref, estimator)
    return grad((logp.detach().exp() * logp * k).sum(), logits)


@pytest.mark.parametrize("seed", range(4))
def test_every_estimator_ppo_allows_in_the_reward_has_the_reverse_kl_gradient(seed):
    logits, ref = categorical(seed)
    want = grad(reverse_kl(torch.log_softmax(logits, 0), ref), logits)
    assert ppo.REWARD_KL_ESTIMATORS == ("k1",)
    for est in ppo.REWARD_KL_ESTIMATORS:
        torch.testing.assert_close(reward_penalty_gradient(est, logits, ref), want)
    for est in ("k2", "k3"):  # why they are refused: as rewards they push elsewhere
        assert (reward_penalty_gradient(est, logits, ref) - want).abs().max() > 1e-3


def bandit(estimator: str, beta: float, steps: int = 3000, lr: float = 10.0):
    """Exact policy-gradient ascent on E_pi[r(a) - beta k(a)] (k as a reward) over 8 actions."""
    g = torch.Generator().manual_seed(0)
    r = torch.rand(8, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(8, generator=g, dtype=torch.float64), 0)
    logits = ref.clone().requires_grad_()
    for _ in range(steps):
        logp = torch.log_softmax(logits, 0)
        reward = r - beta * kl_per_token(logp.detach(), ref, estimator)
        logits = (logits + lr * grad((logp.detach().exp() * logp * reward).sum(), logits)).detach().requires_grad_()
    target = torch.log_softmax(ref + r / beta, 0)   # pi* = ref e^{r / beta} / Z
    return torch.log_softmax(logits.detach(), 0), target


def test_k1_in_the_reward_lands_on_the_kl_regularised_optimum_and_k3_collapses():
    logp, target = bandit("k1", 0.1)
    torch.testing.assert_close(logp.exp(), target.exp(), atol=3e-4, rtol=0)
    entropy = lambda lp: float(torch.special.entr(lp.exp()).sum())  # noqa: E731
    assert entropy(target) > 1.0
    for est in ("k2", "k3"):   # as rewards they miss it: collapse toward the best action(s), or diverge
        lp = bandit(est, 0.1)[0]
        lands = bool(torch.isfinite(lp).all()) and float((lp.exp() - target.exp()).abs().max()) < 0.1 \
            and entropy(lp) > 0.6 * entropy(target)
        assert not lands, est


def test_ppo_refuses_k2_and_k3_in_the_reward_before_writing_anything(tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the dog"] * 32)
    for est in ("k2", "k3"):
        c = load_config(ppo.PPOConfig, None, [
            f"output_dir={tmp_path / 'run'}", f"sft_run={sft}", f"data.prompts={prompts}",
            "reward_fn=tests.ppo_helpers:count_target", "value.init=fresh", f"ppo.kl_estimator={est}",
            "tracking.wandb=false"])
        with pytest.raises(ConfigError, match=f"ppo.kl_estimator='{est}': as a per-token penalty in the reward only k1"):
            ppo.run(c)
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ GRPO: KL in the loss
def in_loss_gradient(estimator, logits, ref, old=None, importance_weight=False):
    """The expected gradient of GRPO's KL term over samples from ``old`` (default: the policy)."""
    logp = torch.log_softmax(logits, 0)
    old = logp.detach() if old is None else old
    kl = grpo_kl(logp, old, ref, torch.ones_like(logp, dtype=torch.bool), estimator, importance_weight)
    return grad((old.exp() * kl).sum(), logits)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_kl_in_the_loss_k3_is_the_forward_kl_k2_the_reverse_and_k1_nothing(seed):
    logits, ref = categorical(seed)
    logp = lambda: torch.log_softmax(logits, 0)  # noqa: E731
    torch.testing.assert_close(in_loss_gradient("k3", logits, ref), grad(forward_kl(logp(), ref), logits))
    torch.testing.assert_close(in_loss_gradient("k2", logits, ref), grad(reverse_kl(logp(), ref), logits))
    # k1 alone is refused (below): its expected gradient is E_pi[grad log pi] = 0
    k1 = torch.log_softmax(logits, 0)
    assert float(grad((k1.detach().exp() * (k1 - ref)).sum(), logits).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="zero gradient in expectation"):
        in_loss_gradient("k1", logits, ref)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_importance_weighted_kl_is_the_reverse_kl_gradient_off_policy(seed):
    logits, ref = categorical(seed)
    _, old_logits = categorical(seed + 100)                    # the sampler: another policy
    old = torch.log_softmax(old_logits, 0)
    want = grad(reverse_kl(torch.log_softmax(logits, 0), ref), logits)
    for est in ("k1", "k3"):
        torch.testing.assert_close(in_loss_gradient(est, logits, ref, old, importance_weight=True), want)
    # without the weight, off-policy samples give k3 a gradient that is neither KL's (the bias)
    plain = in_loss_gradient("k3", logits, ref, old)
    assert (plain - grad(forward_kl(torch.log_softmax(logits, 0), ref), logits)).abs().max() > 1e-3


def test_grpo_refuses_k1_in_the_loss_unless_importance_weighted(tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the dog"] * 32)
    args = ("reward_fn=tests.ppo_helpers:count_target", "grpo.kl_estimator=k1")
    with pytest.raises(ConfigError, match="k1.: in the loss k1's expected gradient is zero"):
        grpo.run(group_cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, *args))
    assert not (tmp_path / "run").exists()
    ok = load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path / 'x'}", f"sft_run={sft}",
                                             f"data.prompts={prompts}", *args, "grpo.kl_importance_weight=true"])
    assert ok.grpo.kl_estimator == "k1"  # accepted with the weight (or with kl_coef=0)


# ------------------------------------------------------------------------------ logged KL on padding
def test_logged_kl_is_finite_when_padding_holds_minus_infinity():
    lp = torch.tensor([[-1.0, -2.0, float("-inf")]])
    ref = torch.tensor([[-1.5, -1.0, float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    assert torch.isnan(kl_per_token(lp, ref) * mask).any()           # what `kl * mask` gave
    torch.testing.assert_close(masked_kl(lp, ref, mask), torch.tensor([[0.5, -1.0, 0.0]]))
    ro = ppo.Rollout(query=torch.zeros(1, 1, dtype=torch.long), query_mask=torch.ones(1, 1, dtype=torch.long),
                     response=torch.zeros(1, 3, dtype=torch.long), response_mask=mask,
                     seq_lengths=torch.tensor([1]), has_stop=torch.tensor([True]), logprobs=lp, ref_logprobs=ref,
                     values=torch.zeros(1, 3), raw_scores=torch.ones(1), scores=torch.ones(1),
                     sample_logprobs=lp, reward_parts=torch.ones(1, 1))
    out = ppo.gae_advantages(ro, 0.1, ppo.PPOAlgoConfig())
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert float(out["kl"].sum()) == pytest.approx(-0.5)


# ------------------------------------------------------------------------------ per-record weights
def _pairs():
    """Two K=2 groups (weights 1 and 3) with rewards / log-probs as leaves."""
    x = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64, requires_grad=True)
    ranks, group, weight = torch.tensor([0.0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0])
    return x, ranks, group, weight


LOSSES = {
    "kwise": lambda x, r, g, n, w, norm: kwise_loss(x, r, g, n, weight=w, norm=norm)[0],
    "dpo": lambda x, r, g, n, w, norm: dpo_loss(x, torch.zeros_like(x), r, g, n, 0.5, weight=w, norm=norm)[0],
    "plackett_luce": lambda x, r, g, n, w, norm: plackett_luce_loss(x, torch.zeros_like(x), r, g, n, 0.5, w, norm),
}


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_weights_give_the_same_gradient_however_the_batch_is_cut(kind):
    f = LOSSES[kind]
    x, ranks, group, weight = _pairs()
    total = 2.0   # groups in the global batch
    # one micro-batch of 2 groups (the Trainer's norm: N / (accum * world) = 2 / 1)
    one = grad(f(x, ranks, group, 2, weight, total), x)
    g0 = grad(f(x[:2], ranks[:2], torch.zeros(2, dtype=torch.long), 1, None, None), x)
    g1 = grad(f(x[2:], ranks[2:], torch.zeros(2, dtype=torch.long), 1, None, None), x)
    want = (1 * g0 + 3 * g1) / 2
    torch.testing.assert_close(one, want)
    # two micro-batches of 1 with accumulation (norm 2 / 2; accelerate divides each loss by 2)
    torch.testing.assert_close(sum([grad(f(x[2 * k:2 * k + 2], ranks[2 * k:2 * k + 2],
                                                 torch.zeros(2, dtype=torch.long), 1, weight[k:k + 1], total / 2) / 2,
                                               x) for k in range(2)]), want)
    # the weighted mean inside each micro-batch (sum w L / sum w) ignores a lone record's weight: what
    # the losses did before
    alone = sum([grad(f(x[2 * k:2 * k + 2], ranks[2 * k:2 * k + 2], torch.zeros(2, dtype=torch.long), 1,
                        weight[k:k + 1], weight[k:k + 1].sum()) / 2, x) for k in range(2)])
    assert (alone - want).abs().max() > 1e-3


def test_a_group_without_an_ordered_pair_is_not_counted():
    assert counts_in_loss([0, 1, 2]) == 1.0 and counts_in_loss([1, 1]) == 0.0
    assert counts_in_loss([1, 1], ties="half") == 1.0
    x, ranks, group = torch.tensor([0.3, -0.2, 0.1, 0.4]), torch.tensor([0.0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    one, _ = kwise_loss(x, ranks, group, 2)            # the tied group is neither summed nor counted
    assert one.item() == pytest.approx(kwise_loss(x[:2], ranks[:2], group[:2], 1)[0].item())


def _conflicting(path, w_happy: float, w_sad: float, n_prompts: int = 24):
    """Every prompt twice: ' happy song' > ' sad rain' with weight w_happy, the reverse with w_sad."""
    with open(path, "w") as f:
        for i in range(n_prompts):
            f.write(json.dumps({"prompt": f"review {i}:", "chosen": " happy song", "rejected": " sad rain",
                                "weight": w_happy}) + "\n")
            f.write(json.dumps({"prompt": f"review {i}:", "chosen": " sad rain", "rejected": " happy song",
                                "weight": w_sad}) + "\n")
    return path


def _heavy_side_eval(path, n: int = 8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"held {i}:", "chosen": " happy song", "rejected": " sad rain"}) + "\n")
    return path


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_a_three_to_one_weighted_conflict_at_batch_size_one_learns_the_heavier_side(stage, tiny_llama, tmp_path):
    """The same records, one at a time, with the weights 3:1 one way and then the other: the learned
    preference follows the heavier side both times (with each record's weight ignored, as it was at
    batch size 1, both runs train identically and learn the same side)."""
    import align.stages.dpo as dpo
    import align.stages.reward as reward
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    held = _heavy_side_eval(tmp_path / "e.jsonl")   # asks for ' happy song' over ' sad rain'
    margins = {}
    for w in ((3.0, 1.0), (1.0, 3.0)):
        data = _conflicting(tmp_path / f"c{w[0]}.jsonl", *w)
        common = [f"output_dir={tmp_path / stage / str(w[0])}", f"sft_run={sft}", f"data.train={data}",
                  f"data.eval={held}", "train.batch_size=1", "train.epochs=2", "train.lr=5e-3", "train.eval_every=0",
                  "train.max_grad_norm=0", "tracking.wandb=false"]  # clipping would rescale every step alike
        if stage == "reward":
            out = reward.run(load_config(reward.RewardConfig, None, [*common, "normalize.source=none"]))
        else:
            out = dpo.run(load_config(dpo.DPOConfig, None, [*common, "eval.kl_prompts=0", "dpo.beta=0.5"]))
        margins[w] = out["eval/margin"]
        assert out["eval/accuracy"] == (1.0 if w[0] > w[1] else 0.0), (w, out)
    assert margins[(3.0, 1.0)] > 0 > margins[(1.0, 3.0)], margins


def _first_losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_reward_stage_loss_and_head_do_not_depend_on_the_micro_batch_split(tiny_llama, tmp_path):
    import align.stages.reward as reward
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    data = tmp_path / "w.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"the dog {i}", "completions": [" happy song", " sad rain", " a dog"],
                                "ranks": [0, 2, 1], "weight": [1.0, 3.0, 0.5, 2.0][i % 4]}) + "\n")
    common = [f"sft_run={sft}", f"data.train={data}", f"data.eval={data}", "train.max_steps=3", "train.log_every=1",
              "train.eval_every=0", "tracking.wandb=false", "normalize.source=none", "center_coef=0.1"]
    reward.run(load_config(reward.RewardConfig, None, [f"output_dir={tmp_path / 'a'}", "train.batch_size=4", *common]))
    reward.run(load_config(reward.RewardConfig, None, [f"output_dir={tmp_path / 'b'}", "train.batch_size=1",
                                                       "train.grad_accum=4", *common]))
    torch.testing.assert_close(torch.tensor(_first_losses(tmp_path / "a")), torch.tensor(_first_losses(tmp_path / "b")),
                               atol=1e-5, rtol=1e-5)
    a = load_file(tmp_path / "a" / "heads" / "reward" / "head.safetensors")
    b = load_file(tmp_path / "b" / "heads" / "reward" / "head.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ reward centering
def test_centering_penalises_the_squared_sum_of_a_groups_rewards_not_the_margin():
    ranks, group = torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long)
    r = torch.tensor([2.0, -2.0])
    plain, _ = kwise_loss(r, ranks, group, 1)
    centred, _ = kwise_loss(r, ranks, group, 1, center_coef=0.5)
    assert centred.item() == pytest.approx(plain.item(), abs=1e-7)          # (2 + -2)^2 = 0: nothing added
    shifted = torch.tensor([3.0, -1.0])                                      # same margin, mid-point 1
    assert kwise_loss(shifted, ranks, group, 1, center_coef=0.5)[0].item() == pytest.approx(plain.item() + 0.5 * 4)
    # K = 3: coef * (sum r)^2 = coef * K^2 * mean^2
    r3, g3 = torch.tensor([1.0, 0.5, 1.5]), torch.zeros(3, dtype=torch.long)
    base3, _ = kwise_loss(r3, torch.tensor([0.0, 1, 2]), g3, 1)
    assert kwise_loss(r3, torch.tensor([0.0, 1, 2]), g3, 1, center_coef=0.1)[0].item() == \
        pytest.approx(base3.item() + 0.1 * 9.0, abs=1e-6)


# ------------------------------------------------------------------------------ RLOO
def test_rloo_on_policy_both_levels_are_reinforce_with_the_leave_one_out_baseline():
    torch.manual_seed(0)
    lp = torch.randn(4, 5, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64), 4)
    seq, _ = rloo_loss(lp, lp.detach(), adv, mask)
    # REINFORCE: -(1/B) sum_i A_i sum_t log pi(y_it)
    reinforce = lambda: -(adv[:, None] * torch.where(mask, lp, 0.0)).sum() / 4  # noqa: E731
    torch.testing.assert_close(grad(seq, lp), grad(reinforce(), lp))
    tok, _ = rloo_loss(lp, lp.detach(), adv, mask, level="token")
    torch.testing.assert_close(grad(tok, lp), grad(reinforce() * 4 / mask.sum(), lp))


def test_rloo_sequence_ratio_off_policy_by_hand():
    lp = torch.tensor([[-1.0, -1.0], [-0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.05, -1.0], [-1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = torch.tensor([1.0, 2.0], dtype=torch.float64)
    loss, st = rloo_loss(lp, old, adv, mask, clip_range=0.2)
    import math
    r0, r1 = math.exp(0.05), math.exp(0.5)                  # 1.051 (inside the clip), 1.649 (clipped at 1.2)
    want = (max(-1.0 * r0, -1.0 * r0) + max(-2.0 * r1, -2.0 * 1.2)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-9)
    assert float(st["clipfrac"]) == 0.5
    g = grad(loss, lp)
    torch.testing.assert_close(g[0], torch.full((2,), -1.0 * r0 / 2, dtype=torch.float64))  # d/dlp ratio = ratio
    torch.testing.assert_close(g[1], torch.zeros(2, dtype=torch.float64))                   # clipped: no gradient


@pytest.mark.parametrize("fn", ["rloo_sequence", "rloo_token", "grpo", "dr_grpo", "dapo"])
def test_group_losses_summed_over_chunks_equal_the_whole_minibatch(fn):
    torch.manual_seed(1)
    lp = torch.randn(8, 4, dtype=torch.float64).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(8, 4, dtype=torch.float64)
    ref = lp.detach() + 0.1 * torch.randn(8, 4, dtype=torch.float64)
    mask = torch.rand(8, 4) > 0.3
    mask[:, 0] = True
    adv = torch.randn(8, dtype=torch.float64)

    def loss(rows, denominator=None):
        m = mask[rows]
        if fn.startswith("rloo"):
            return rloo_loss(lp[rows], old[rows], adv[rows], m, 0.2, fn.split("_")[1], denominator)[0]
        return grpo_loss(lp[rows], old[rows], ref[rows], adv[rows], m, 0.2, 0.1, "k3", fn, 4,
                         denominator=denominator)[0]
    whole = loss(torch.arange(8))
    chunks = torch.tensor_split(torch.arange(8), 3)                # 3, 3, 2 rows: unequal
    count = float(mask.sum()) if fn in ("rloo_token", "dapo") else 8.0
    summed = sum(loss(c, count / 3) / 3 for c in chunks)           # accelerate divides each by the 3 steps
    torch.testing.assert_close(summed, whole)
    torch.testing.assert_close(grad(summed, lp), grad(whole, lp))
    naive = sum(loss(c) / 3 for c in chunks)                        # each chunk's own mean: what it was
    assert abs(float((naive - whole).detach())) > 1e-6


def _grpo_case(seed=3):
    torch.manual_seed(seed)
    lp = torch.randn(4, 5, dtype=torch.float64).requires_grad_()
    old = lp.detach() + 0.05 * torch.randn(4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    return lp, old, mask, adv


def test_dapo_weighs_every_token_of_the_batch_alike_and_grpo_every_response():
    """On policy (ratio 1, no clipping, beta 0) the gradient of each token's log-prob is -A / N:
    DAPO: N = the batch's token count; GRPO: N = B x the response's own length."""
    lp, old, mask, adv = _grpo_case()
    old = lp.detach().clone()
    for variant in ("dapo", "grpo"):
        loss, _ = grpo_loss(lp, old, old, adv, mask, 0.2, 0.0, "k3", variant)
        g = grad(loss, lp)
        n = mask.sum() if variant == "dapo" else 4 * mask.sum(1, keepdim=True)
        want = torch.where(mask, -adv[:, None] / n, torch.zeros_like(lp))
        torch.testing.assert_close(g, want)


def test_clip_higher_lets_a_positive_advantage_raise_its_ratio_further():
    """ratio 1.25 with A > 0: clipped at 1.2 (no gradient) symmetrically; below 1.28 with DAPO's
    clip-higher, so the gradient flows. The lower bound is unchanged."""
    lp = torch.full((1, 2), float(torch.log(torch.tensor(1.25))), dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for high, flows in ((None, False), (0.28, True)):
        loss, st = grpo_loss(lp, old, old, torch.tensor([1.0], dtype=torch.float64), mask, 0.2, 0.0,
                             clip_high=high)
        assert bool(grad(loss, lp).abs().sum() > 0) == flows
        assert float(st["clipfrac"]) == (0.0 if flows else 1.0)
    low = torch.full((1, 2), float(torch.log(torch.tensor(0.7))), dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(low, old, old, torch.tensor([-1.0], dtype=torch.float64), mask, 0.2, 0.0, clip_high=0.28)
    assert float(grad(loss, low).abs().sum()) == 0.0     # 0.7 < 1 - 0.2: clipped below as before


def test_gspo_gives_every_token_of_a_response_its_length_normalised_sequence_ratio():
    lp, old, mask, adv = _grpo_case()
    loss, st = grpo_loss(lp, old, old, adv, mask, 10.0, 0.0, ratio_level="sequence")
    seq = (torch.where(mask, lp - old, torch.zeros_like(lp)).sum(1) / mask.sum(1)).exp()
    want = (-adv * seq).mean()      # no clipping at 10; each response's tokens all carry seq
    torch.testing.assert_close(loss, want)
    assert float(st["ratio_mean"]) == pytest.approx(float((seq[:, None].expand_as(lp)[mask]).mean()))


def test_truncated_responses_add_nothing_to_the_loss_and_stay_in_the_count():
    lp, old, mask, adv = _grpo_case()
    truncated = torch.tensor([False, True, False, True])
    for variant in ("grpo", "dapo"):
        loss, _ = grpo_loss(lp, old, old, adv, mask, 0.2, 0.0, loss_type=variant, truncated=truncated)
        g = grad(loss, lp)
        assert float(g[truncated].abs().sum()) == 0.0 and float(g[~truncated].abs().sum()) > 0
    kept = ~truncated
    whole, _ = grpo_loss(lp, old, old, adv, mask, 0.2, 0.0, loss_type="grpo", truncated=truncated)
    part, _ = grpo_loss(lp[kept], old[kept], old[kept], adv[kept], mask[kept], 0.2, 0.0, loss_type="grpo")
    torch.testing.assert_close(whole, part * kept.sum() / 4)   # a truncated response counts as a 0


def test_a_dapo_gspo_run_with_truncation_masked_trains_and_logs(tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    grpo.run(group_cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, "reward_fn=tests.ppo_helpers:count_target",
                       "grpo.loss_type=dapo", "grpo.cliprange_high=0.28", "grpo.ratio_level=sequence",
                       "grpo.mask_truncated=true", "grpo.iterations=2", "grpo.rollout_batch_size=8",
                       "grpo.response_length=4", "grpo.num_epochs=2"))
    m = [x for x in (json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
         if "policy/loss" in x]
    assert len(m) == 2 and all(torch.isfinite(torch.tensor(x["policy/loss"])) for x in m)
    assert m[0]["policy/first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("section", ["grpo", "rloo"])
def test_group_stage_result_does_not_depend_on_the_micro_batch_size(section, tiny_llama, tmp_path):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft", LORA_HEAD)
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    cls, run = (grpo.GRPOConfig, grpo.run) if section == "grpo" else (rloo.RLOOConfig, rloo.run)
    common = ["reward_fn=tests.ppo_helpers:count_target", f"{section}.iterations=2",
              f"{section}.rollout_batch_size=8", f"{section}.group_size=4", f"{section}.response_length=6",
              f"{section}.num_epochs=2", f"{section}.lr=1e-2", f"{section}.missing_stop_mode=none",
              f"{section}.max_grad_norm=0"]
    if section == "rloo":
        common.append("rloo.ratio_level=token")   # the level whose token mean depended on the split
    run(group_cfg(cls, section, tmp_path, sft, prompts, *common, f"{section}.micro_batch_size=8", name="whole"))
    run(group_cfg(cls, section, tmp_path, sft, prompts, *common, f"{section}.micro_batch_size=3", name="cut"))
    a = load_file(tmp_path / "whole" / "adapters" / "policy" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapters" / "policy" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


# ------------------------------------------------------------------------------ normalisation temperature
def test_the_pipeline_samples_the_reward_statistics_at_the_policy_temperature(monkeypatch, tmp_path):
    import align.demo.pipeline as pipeline
    import align.stages.reward as reward
    seen = {}
    monkeypatch.setattr(reward, "run", lambda c: seen.setdefault("cfg", c))
    cfg = pipeline.PipelineConfig(output_dir=str(tmp_path), temperature=0.7)
    pipeline._reward(cfg, tmp_path / "sft", tmp_path / "rankings.jsonl", tmp_path)
    assert seen["cfg"].normalize.temperature == 0.7


def test_a_policy_stage_warns_when_the_statistics_were_sampled_at_another_temperature(tiny_llama, tmp_path, capsys):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm")
    head = rm / "heads" / "reward" / "head.json"
    rec = json.loads(head.read_text())
    rec["normalisation"]["temperature"] = 1.0
    head.write_text(json.dumps(rec))
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the dog"] * 16)
    grpo.run(group_cfg(grpo.GRPOConfig, "grpo", tmp_path, sft, prompts, f"reward_run={rm}", "grpo.iterations=1",
                       "grpo.rollout_batch_size=8", "grpo.response_length=2", "grpo.temperature=0.7"))
    out = capsys.readouterr()
    assert "sampled at temperature 1.0" in out.out + out.err and "grpo.temperature=0.7" in out.out + out.err
