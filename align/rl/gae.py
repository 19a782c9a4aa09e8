"""Generalized advantage estimation (Schulman et al. 2016) over response tokens (docs/ppo-notes.md §F1)."""
from __future__ import annotations

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95):
    """Advantages and returns by the backward recursion (N+/2019 loop, clean terminal):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V        (computed here, i.e. *before* any advantage whitening)

    rewards, values, mask: [B, T]; mask is True on each row's real tokens, which form a prefix
    (positions 0..sequence_length). Values and rewards beyond the last real token are taken as 0
    (the episode ends on the stop token; N+ instead keeps V on the first pad, its D4 quirk), so
    padding contributes nothing. Returns (advantages, returns), both [B, T], 0 on masked positions.
    Defaults gamma = 1, lam = 0.95 (E4, F1).
    """
    m = mask.bool()
    values = torch.where(m, values, torch.zeros_like(values))
    rewards = torch.where(m, rewards, torch.zeros_like(rewards))
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    advantages = torch.where(m, advantages, torch.zeros_like(advantages))
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns
