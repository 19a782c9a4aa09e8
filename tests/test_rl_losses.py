"""align.rl.losses: clipped policy loss, clipped value loss, explained variance (checked by hand)."""
from __future__ import annotations

import math

import pytest
import torch

from align.rl.losses import explained_variance, policy_loss, value_loss


def test_policy_loss_at_ratio_one():
    """First PPO minibatch (N+ log): ratio exactly 1, approxkl 0, clipfrac 0, loss = -mean(A)."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 1, 4])[:, None]
    loss, st = policy_loss(lp.clone().requires_grad_(), lp, adv, mask)
    assert loss.item() == pytest.approx(-adv[mask].mean().item(), abs=1e-7)
    assert st["approxkl"].item() == 0.0 and st["clipfrac"].item() == 0.0
    assert st["ratio_mean"].item() == 1.0 and st["ratio_max"].item() == 1.0


def test_policy_loss_clipping_by_hand():
    eps = 0.2
    #            A=+1,r=1.5   A=+1,r=0.5   A=-1,r=0.5   A=-1,r=1.5   pad (garbage)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    new = (old + ratio.log()).clone()
    new[0, 4] = 500.0                               # exp(501) would overflow if not masked
    new.requires_grad_()
    loss, st = policy_loss(new, old, adv, mask, eps)
    # per token max(-A r, -A clip(r)): max(-1.5,-1.2)=-1.2 (clipped), max(-0.5,-0.8)=-0.5,
    #                                  max(0.5,0.8)=0.8 (clipped),     max(1.5,1.2)=1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    l15, l05 = math.log(1.5), math.log(0.5)
    assert st["approxkl"].item() == pytest.approx(0.5 * (2 * l15 ** 2 + 2 * l05 ** 2) / 4)
    assert st["ratio_mean"].item() == pytest.approx(1.0)
    assert st["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    # d/dlogp of -A*r = -A*r/N on unclipped tokens; clipped tokens and the pad get 0
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0])
    assert not any(v.requires_grad for v in st.values())


def test_value_loss_clipping_by_hand():
    eps = 0.2
    old = torch.zeros(1, 5)
    v = torch.tensor([[0.5, 0.5, 0.1, -0.5, 3.0]], requires_grad=True)
    ret = torch.tensor([[1.0, 0.0, 1.0, -1.0, -9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, st = value_loss(v, old, ret, mask, eps)
    # V_clip = [0.2, 0.2, 0.1, -0.2]; (V-R)^2 = [.25, .25, .81, .25]; (Vc-R)^2 = [.64, .04, .81, .64]
    # max = [.64 (clipped), .25, .81, .64 (clipped)] -> 0.5 * 2.34 / 4
    assert loss.item() == pytest.approx(0.5 * 2.34 / 4)
    assert st["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # grad 0.5 * 2 (V-R) / N on unclipped tokens (V within its clip range keeps the gradient)
    assert v.grad.tolist()[0] == pytest.approx([0.0, 0.5 / 4, -0.9 / 4, 0.0, 0.0])


def test_value_loss_zero_at_targets():
    v = torch.randn(3, 4)
    loss, st = value_loss(v, v, v, torch.ones(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and st["vf_clipfrac"].item() == 0.0


def test_explained_variance():
    g = torch.Generator().manual_seed(5)
    ret = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    const = torch.full_like(ret, 0.3)
    assert explained_variance(const, ret, mask).item() == pytest.approx(0.0, abs=1e-12)
    noisy = ret + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    res = (ret - noisy)[mask]
    expect = 1 - res.var(unbiased=False) / ret[mask].var(unbiased=False)
    assert explained_variance(noisy, ret, mask).item() == pytest.approx(expect.item())
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)).item())
