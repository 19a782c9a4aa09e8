"""align.rl.gae: hand-computed example and a naive reference on random inputs."""
from __future__ import annotations

import pytest
import torch

from align.rl.gae import compute_gae


def test_gae_hand_computed_with_masked_tail():
    # row 0: T=3 real tokens + 1 pad (pad values/rewards are garbage and must be ignored)
    # gamma=1, lam=0.95, V_3 := 0 (beyond the last real token)
    #   delta_2 = 1.0  + 0   - 0.3 =  0.7     A_2 = 0.7
    #   delta_1 = -0.2 + 0.3 - 0.4 = -0.3     A_1 = -0.3 + 0.95*0.7   = 0.365
    #   delta_0 = -0.1 + 0.4 - 0.5 = -0.2     A_0 = -0.2 + 0.95*0.365 = 0.14675
    #   returns = A + V = [0.64675, 0.765, 1.0, 0]
    # row 1: 4 real tokens, V = 0, a single reward 1 at the end: A_t = 0.95^(3-t)
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 5.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.14675, 0.365, 0.7, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.64675, 0.765, 1.0, 0.0])
    assert adv.tolist()[1] == pytest.approx([0.857375, 0.9025, 0.95, 1.0])
    assert ret.tolist()[1] == pytest.approx([0.857375, 0.9025, 0.95, 1.0])


def naive_gae(rewards, values, mask, gamma, lam):
    """Sum form, row by row: A_t = sum_l (gamma*lam)^l delta_{t+l} over the real tokens only."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        v = [float(values[b, t]) for t in range(L)] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
    ret = torch.where(mask, adv + values, torch.zeros_like(adv))
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_reference(gamma, lam):
    g = torch.Generator().manual_seed(7)
    B, T = 8, 10
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, adv_ref) and torch.allclose(ret, ret_ref)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # padding content is irrelevant
    noisy = compute_gae(rewards + 100 * (~mask), values - 50 * (~mask), mask, gamma, lam)
    assert torch.equal(noisy[0], adv) and torch.equal(noisy[1], ret)
