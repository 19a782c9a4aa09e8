"""align.rl.rewards: per-token KL penalty on real tokens, the score exactly at the last real token."""
from __future__ import annotations

import pytest
import torch

from align.rl.gae import compute_gae
from align.rl.rewards import compute_token_rewards, whiten_rewards
from align.rl.rollout import response_mask_from_lengths


def test_reward_placement_by_hand():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                       [0.5, -0.1, float("nan"), 9.0],   # garbage on pads must not leak
                       [0.2, 0.0, 0.0, 0.0]])
    seq_len = torch.tensor([3, 1, 0])
    mask = response_mask_from_lengths(seq_len, 4)
    scores = torch.tensor([1.0, -2.0, 0.5])
    beta = 0.1
    rewards, non_score = compute_token_rewards(scores, kl, beta, mask, seq_len)
    expect_ns = torch.tensor([[-0.01, -0.02, -0.03, -0.04],
                              [-0.05, 0.01, 0.0, 0.0],
                              [-0.02, 0.0, 0.0, 0.0]])
    expect_r = expect_ns.clone()
    expect_r[0, 3] += 1.0
    expect_r[1, 1] += -2.0
    expect_r[2, 0] += 0.5
    assert torch.allclose(non_score, expect_ns)
    assert torch.allclose(rewards, expect_r)
    assert (rewards[~mask] == 0).all() and (non_score[~mask] == 0).all()
    # every real token carries -beta*kl; the score is on the last real token and nowhere else
    assert torch.allclose((rewards - non_score)[torch.arange(3), seq_len], scores)
    assert torch.allclose((rewards - non_score).sum(1), scores)


def test_reward_rejects_score_on_pad():
    mask = response_mask_from_lengths(torch.tensor([1]), 3)
    with pytest.raises(ValueError):
        compute_token_rewards(torch.ones(1), torch.zeros(1, 3), 0.1, mask, torch.tensor([2]))


def test_lambda_one_returns_are_score_minus_remaining_kl():
    """With gamma = lam = 1 the GAE return is the Monte-Carlo return: score - beta * sum_{s>=t} kl_s."""
    g = torch.Generator().manual_seed(3)
    B, T, beta = 5, 6, 0.2
    kl = torch.rand(B, T, generator=g, dtype=torch.float64)
    seq_len = torch.tensor([5, 0, 2, 3, 4])
    mask = response_mask_from_lengths(seq_len, T)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards, _ = compute_token_rewards(scores, kl, beta, mask, seq_len)
    _, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    kl_to_go = (kl * mask).flip(1).cumsum(1).flip(1)
    expect = torch.where(mask, scores[:, None] - beta * kl_to_go, torch.zeros_like(kl))
    assert torch.allclose(returns, expect)


def test_whiten_rewards_keeps_mean():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(4, 5, generator=g, dtype=torch.float64) + 3
    mask = response_mask_from_lengths(torch.tensor([4, 2, 0, 3]), 5)
    w = whiten_rewards(r, mask)
    assert w[mask].mean().item() == pytest.approx(r[mask].mean().item())
    assert w[mask].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all()
