"""Per-token rewards: the KL penalty on every real token, the sequence score on the last one
(docs/ppo-notes.md §D4, §E1, §E3)."""
from __future__ import annotations

import torch

from align.rl.functional import masked_whiten


def compute_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                          response_mask: torch.Tensor, sequence_lengths: torch.Tensor):
    """Token rewards of the KL-regularized objective: score(x, y) - kl_coef * sum_t kl_t.

    scores [B] (after normalization / missing-stop penalty), kl [B, T] per-token KL estimate,
    response_mask [B, T] (True on real tokens), sequence_lengths [B] (index of the last real
    token). Returns (rewards, non_score_reward), both [B, T] and exactly 0 on pads:
      non_score_reward[b, t] = -kl_coef * kl[b, t]          on real tokens (E1; a reward, not a loss)
      rewards = non_score_reward, plus rewards[b, sequence_lengths[b]] += scores[b].

    Placement choice: the score sits on the last real token (the stop token, or T - 1 when the
    response has none): the "clean" placement. N+ and TRL add it one position later, on the first
    pad after the stop token when that exists (the D4 quirk, whose stop-token advantage becomes
    -beta*kl + lam*score + (1-lam)V_{t+1} - V_t); we do not reproduce it, so with gamma = 1 the
    Monte-Carlo return from any real token is the score minus the KL penalty still to come.
    """
    mask = response_mask.bool()
    non_score_reward = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    rows = torch.arange(kl.shape[0], device=kl.device)
    if not bool(mask[rows, sequence_lengths].all()):
        raise ValueError("sequence_lengths must index a real token of each row (response_mask)")
    rewards = non_score_reward.clone()
    rewards[rows, sequence_lengths] += scores.to(rewards.dtype)
    return rewards, non_score_reward


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Optional reward whitening (2019: on; N+ final runs: off): ``(r - mean) / std + mean`` over
    real tokens, i.e. unit spread with the mean kept (masked_whiten(shift_mean=False)).
    [B, T] -> [B, T], 0 on pads."""
    return masked_whiten(rewards, mask, shift_mean=False)
