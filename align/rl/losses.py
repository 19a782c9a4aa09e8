"""PPO's clipped losses (Schulman et al. 2017; value clipping as in baselines ppo2):
docs/ppo-notes.md §F3, §F4.

All inputs are [B, T] per response token, aligned to the action index; ``mask`` is True on real
tokens. Losses are masked means over tokens (N+); stats are detached scalars.
"""
from __future__ import annotations

import torch

from align.rl.functional import masked_mean, masked_var


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2):
    """Clipped surrogate: masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).

    ratio = exp(logprobs - old_logprobs) (logprobs carry the gradient; old_logprobs and
    advantages come from the rollout). No entropy bonus (N+). Returns (loss, stats) with
      clipfrac   = masked mean of [clipped term > unclipped term] (N+ ``pg_clipfrac``),
      approxkl   = 0.5 * masked mean of logr^2 (N+; N+ takes an unmasked mean over tokens whose
                   pads hold equal constants, i.e. the same numerator diluted by pads),
      ratio_mean, ratio_max over real tokens.
    Padding is neutralized (logr := 0 there), so garbage log-probs on pads cannot give NaN/inf.
    """
    m = mask.bool()
    logr = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(logr)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), m),
            "approxkl": 0.5 * masked_mean(logr ** 2, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, torch.zeros_like(ratio)).max() if m.any() else ratio.new_tensor(1.0),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_value: float = 0.2):
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2)),
    V_clip = clamp(V, V_old - eps, V_old + eps) (baselines ppo2, N+ ``vf_loss``).

    values carry the gradient; old_values (rollout values) and returns are targets.
    Returns (loss, stats) with vf_clipfrac = masked mean of [clipped loss > unclipped loss].
    """
    m = mask.bool()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), m)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over real tokens (biased variances); scalar tensor.

    1 = perfect value predictions, 0 = no better than a constant, < 0 = worse. NaN when Var[R] = 0
    (undefined; as in CleanRL / SB3). A healthy PPO-RLHF run rises to ~0.75-0.9 (docs/ppo-notes.md §6.7).
    """
    var_returns = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))
