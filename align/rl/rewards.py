"""Per-token rewards: the KL penalty on every real token, the score at the last one."""
from __future__ import annotations

import torch

from align.rl.functional import masked_whiten


def compute_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                          response_mask: torch.Tensor, sequence_lengths: torch.Tensor):
    """rewards[b, t] = -kl_coef * kl[b, t] on real tokens, plus scores[b] at t = sequence_lengths[b].

    The score sits on the last real token (the stop token): the "clean" placement. N+ and TRL put
    it one position later (the first pad) when that exists; we do not reproduce that quirk.
    Returns (rewards, non_score_reward), both [B, T] and 0 on pads.
    """
    mask = response_mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, sequence_lengths] += scores.to(rewards.dtype)
    return rewards, non_score


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Divide by the std over real tokens, keep the mean (2019: shift_mean=False)."""
    return masked_whiten(rewards, mask, shift_mean=False)
