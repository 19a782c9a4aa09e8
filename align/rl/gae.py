"""Generalised advantage estimation (Schulman et al. 2016) over response tokens."""
from __future__ import annotations

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95):
    """delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns = A + V.

    Values beyond a row's last real token count as 0 (the episode ends there), so padding adds
    nothing; outputs are 0 on masked positions. Returns are taken before advantage whitening.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    t_len = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(t_len)):
        next_v = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    returns = (adv + values) * mask
    return adv, returns
