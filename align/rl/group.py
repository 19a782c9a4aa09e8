"""Critic-free policy gradients on groups of samples per prompt: GRPO, Dr. GRPO and RLOO.

A rollout batch holds ``G`` consecutive responses per prompt (rows ``g*G .. g*G+G-1`` answer the
same prompt). The advantage of a response is measured against the other responses to its prompt,
so no value model is needed:

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, the same for
  every token of response ``i``; the loss is the clipped ratio objective plus ``beta`` times the
  k3 estimate of KL(pi || pi_ref) at every token, each response's token losses averaged over its
  own length, then averaged over responses.
* Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no division by the group std
  (it up-weights prompts whose answers all score alike) and no per-response length normalisation
  (it favours long wrong answers): token losses summed and divided by a constant, the maximum
  response length.
* RLOO (Ahmadian et al. 2024): the KL penalty goes into the reward, ``R_i = r_i - beta * sum_t
  KL_t``, and the baseline of response ``i`` is the mean of the *other* ``G - 1`` responses'
  ``R``: ``A_i = R_i - (sum_g R - R_i) / (G - 1)``, an unbiased estimate. The loss is the clipped
  ratio objective (as TRL's RLOO), averaged over tokens.
"""
from __future__ import annotations

import torch

from align.rl.functional import masked_mean
from align.rl.kl import kl_per_token


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rows do not form groups of {group_size} (need >= 2 per group)")
    return x.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B] scores -> [B] advantages: score minus its group's mean, divided by the group's std when
    ``scale`` (GRPO; Dr. GRPO: ``scale=False``). A group whose responses all score alike gets 0."""
    g = _groups(scores.float(), group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] rewards -> [B] leave-one-out advantages ``R_i - mean_{j != i} R_j``."""
    g = _groups(rewards.float(), group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def clipped_token_losses(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """Per-token clipped surrogate ``max(-A ratio, -A clip(ratio))`` [B, T] for sequence-level
    advantages [B], and its statistics (clip fraction, approximate KL to the old policy, ratio)."""
    m = mask.bool()
    logr = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(logr)
    a = advantages[:, None].to(ratio.dtype)
    l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).to(ratio.dtype), m), "approxkl": 0.5 * masked_mean(logr ** 2, m),
                 "ratio_mean": masked_mean(ratio, m)}
    return torch.max(l1, l2), stats


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range: float = 0.2,
              beta: float = 0.04, kl_estimator: str = "k3", variant: str = "grpo", max_length: int | None = None):
    """GRPO's (``variant="grpo"``) or Dr. GRPO's (``"dr_grpo"``) loss of a chunk of responses.
    ``logprobs`` carry the gradient; ``old_logprobs`` (rollout), ``ref_logprobs`` (reference) and
    ``advantages`` [B] are constants. Returns (loss, stats incl. the mean per-token KL)."""
    m = mask.bool()
    tok, stats = clipped_token_losses(logprobs, old_logprobs, advantages, m, clip_range)
    kl = torch.where(m, kl_per_token(logprobs, ref_logprobs, kl_estimator), torch.zeros_like(logprobs))
    per_token = (tok + beta * kl) * m
    if variant == "grpo":
        loss = (per_token.sum(1) / m.sum(1).clamp(min=1)).mean()
    elif variant == "dr_grpo":
        loss = per_token.sum(1).mean() / float(max_length or m.shape[1])
    else:
        raise ValueError(f"variant={variant!r}: choose grpo or dr_grpo")
    stats["kl"] = masked_mean(kl.detach(), m)
    return loss, stats


def rloo_loss(logprobs, old_logprobs, advantages, mask, clip_range: float = 0.2):
    """RLOO's clipped objective with leave-one-out advantages [B], averaged over real tokens."""
    m = mask.bool()
    tok, stats = clipped_token_losses(logprobs, old_logprobs, advantages, m, clip_range)
    return masked_mean(tok, m), stats
