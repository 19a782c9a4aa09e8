"""PPO's clipped losses (Schulman et al. 2017; value clipping as in baselines ppo2)."""
from __future__ import annotations

import torch

from align.rl.functional import masked_mean, masked_var


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float = 0.2):
    """masked mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)); stats: clipfrac,
    approxkl = 0.5 * mean(logr^2) (N+), ratio mean and max."""
    logr = logprobs - old_logprobs
    ratio = torch.exp(logr)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask),
                 "approxkl": 0.5 * masked_mean(logr ** 2, mask),
                 "ratio_mean": masked_mean(ratio, mask),
                 "ratio_max": ratio[mask.bool()].max() if mask.any() else torch.tensor(1.0)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value: float = 0.2):
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((l2 > l1).float(), mask)}
    return loss, stats


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over real tokens."""
    var_r = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)
