"""Critic-free policy gradients on groups of samples per prompt: GRPO, Dr. GRPO and RLOO.

A rollout batch holds ``G`` consecutive responses per prompt (rows ``g*G .. g*G+G-1`` answer the
same prompt). The advantage of a response is measured against the other responses to its prompt,
so no value model is needed:

* GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, the same for
  every token of response ``i``; the loss is the clipped ratio objective plus ``beta`` times a
  per-token KL estimate in the loss (``grpo_kl``: k3 by default, whose gradient is that of the
  forward KL(pi_ref || pi), as in DeepSeekMath and TRL), each response's token losses averaged
  over its own length, then averaged over responses.
* Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no division by the group std
  (it up-weights prompts whose answers all score alike) and no per-response length normalisation
  (it favours long wrong answers): token losses summed and divided by a constant, the maximum
  response length.
* DAPO (Yu et al. 2025): token-level normalisation -- every real token of the minibatch weighs the
  same, so a long response is not averaged down -- with "clip-higher" (an upper ratio bound
  ``1 + clip_high`` above the lower ``1 - clip``) and, optionally, truncated responses left out of
  the loss; these are options of GRPO's loss (``grpo_loss``), as in TRL's GRPOTrainer.
* BNPO (TRL's ``bnpo``): token-level normalisation within each micro-batch (chunk) instead of the
  whole minibatch; the minibatch's loss is the mean of its chunks' token means.
* GSPO (Zheng et al. 2025): one importance ratio per response, ``exp(mean_t log pi/pi_old)``,
  clipped per response (``ratio_level="sequence"``), in place of the per-token ratios.
* RLOO (Ahmadian et al. 2024): the KL penalty goes into the reward, ``R_i = r_i - beta * sum_t
  KL_t``, and the baseline of response ``i`` is the mean of the *other* ``G - 1`` responses'
  ``R``: ``A_i = R_i - (sum_g R - R_i) / (G - 1)``, an unbiased estimate. The loss is the clipped
  ratio objective with the whole response as one action (one ratio per response, as the paper
  and TRL), averaged over responses; a per-token ratio is an option.

The full statement of each objective, with references: docs/objectives.md.
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


def clipped_token_losses(logprobs, old_logprobs, advantages, mask, clip_range: float, clip_high: float | None = None,
                         ratio_level: str = "token"):
    """Per-token clipped surrogate ``max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip_high))`` [B, T]
    for sequence-level advantages [B] (``clip_high`` None: ``clip_range``), and its statistics
    (clip fraction, approximate KL to the old policy, ratio). ``ratio_level="sequence"`` (GSPO): every
    token of a response carries the response's ratio ``exp(mean_t log pi/pi_old)``."""
    m = mask.bool()
    logr = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    if ratio_level == "sequence":
        seq = logr.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        logr = torch.where(m, seq.expand_as(logr), torch.zeros_like(logr))
    elif ratio_level != "token":
        raise ValueError(f"ratio_level={ratio_level!r}: choose token or sequence")
    ratio = torch.exp(logr)
    a = advantages[:, None].to(ratio.dtype)
    hi = clip_range if clip_high is None else clip_high
    l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + hi)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).to(ratio.dtype), m), "approxkl": 0.5 * masked_mean(logr ** 2, m),
                 "ratio_mean": masked_mean(ratio, m)}
    return torch.max(l1, l2), stats


def _over(total: torch.Tensor, count, denominator) -> torch.Tensor:
    """``total / denominator`` (the loop's share of a global count) or, without one, ``total / count``."""
    d = count if denominator is None else denominator
    return total / (d.clamp(min=1) if torch.is_tensor(d) else max(float(d), 1e-8))


def grpo_kl(logprobs, old_logprobs, ref_logprobs, mask, estimator: str = "k3", importance_weight: bool = False):
    """The per-token KL term of GRPO's loss [B, T] (0 on padding), differentiated through
    ``logprobs`` (docs/objectives.md):

    * ``k3`` (DeepSeekMath, TRL): its expected gradient is that of the *forward* KL(pi_ref || pi);
    * ``k2``: its expected gradient is that of the reverse KL(pi || pi_ref), the RLHF objective's;
    * ``k1`` in the loss has zero expected gradient (E_pi[grad log pi] = 0) and is refused unless
    * ``importance_weight``: the term is multiplied by the ratio pi / pi_old *with* its gradient
      (TRL's ``use_bias_correction_kl``). The term's expectation under the sampler is then E_pi[k]
      at the current policy, whatever the epoch or minibatch, and its gradient is grad E_pi[k]:
      grad KL(pi || pi_ref) for k1 and k3 (both unbiased estimates of it).
    """
    m = mask.bool()
    if estimator == "k1" and not importance_weight:
        raise ValueError("kl_estimator=k1 in the loss has zero gradient in expectation; use k2 or k3, "
                         "or k1 with the importance weight")
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    if importance_weight:
        kl = kl * torch.exp(torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs)))
    return torch.where(m, kl, torch.zeros_like(kl))


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range: float = 0.2,
              beta: float = 0.04, kl_estimator: str = "k3", loss_type: str = "grpo", max_length: int | None = None,
              kl_importance_weight: bool = False, denominator=None, clip_high: float | None = None,
              ratio_level: str = "token", truncated=None):
    """GRPO's (``loss_type="grpo"``), Dr. GRPO's (``"dr_grpo"``), DAPO's (``"dapo"``) or BNPO's
    (``"bnpo"``) loss of a chunk
    of responses. ``logprobs`` carry the gradient; ``old_logprobs`` (rollout), ``ref_logprobs``
    (reference) and ``advantages`` [B] are constants. GRPO: each response's token losses averaged
    over its own length; Dr. GRPO: summed and divided by ``max_length``; then the sum over
    responses divided by ``denominator`` (the loop passes the global minibatch's response count over
    its chunks, so the loss does not depend on how a minibatch is split) or, without one, by this
    chunk's count. DAPO: the sum over every real token divided by ``denominator`` (the loop: the
    minibatch's counted tokens over its chunks) or this chunk's counted token count. BNPO (TRL's
    ``bnpo``): the token mean of this chunk alone (the loop passes no denominator), so the minibatch's
    loss is the mean of its chunks' token means. ``clip_high``: the upper
    ratio bound's clip (clip-higher; None: ``clip_range``); ``ratio_level="sequence"``: GSPO's
    per-response ratio; ``truncated`` [B] bool: responses whose token losses count as 0 (DAPO's
    overlong filtering; they stay in the response count, as in TRL). The KL term: ``grpo_kl``.
    Returns (loss, stats incl. the mean per-token KL estimate)."""
    m = mask.bool()
    tok, stats = clipped_token_losses(logprobs, old_logprobs, advantages, m, clip_range, clip_high, ratio_level)
    kl = grpo_kl(logprobs, old_logprobs, ref_logprobs, m, kl_estimator, kl_importance_weight) if beta else \
        torch.zeros_like(tok)
    counted = m if truncated is None else m & ~truncated.bool()[:, None]
    per_token = torch.where(counted, tok + beta * kl, torch.zeros_like(tok))
    if loss_type in ("dapo", "bnpo"):
        loss = _over(per_token.sum(), counted.sum(), denominator if loss_type == "dapo" else None)
        stats["kl"] = masked_mean(kl.detach(), m)
        return loss, stats
    if loss_type == "grpo":
        per_response = per_token.sum(1) / m.sum(1).clamp(min=1)
    elif loss_type == "dr_grpo":
        per_response = per_token.sum(1) / float(max_length or m.shape[1])
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose grpo, dr_grpo, dapo or bnpo")
    loss = _over(per_response.sum(), torch.tensor(m.shape[0]), denominator)
    stats["kl"] = masked_mean(kl.detach(), m)
    return loss, stats


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of responses of ``lengths`` tokens
    [B] with at most ``max_length`` tokens: 0 up to ``max_length - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_length`` (``(max_length - buffer - length) / buffer * factor``),
    and ``-factor`` beyond. Added to the score before the group advantages."""
    if buffer < 1 or buffer > max_length:
        raise ValueError(f"overlong buffer {buffer}: give 1 .. max_length ({max_length})")
    excess = (lengths.float() - (max_length - buffer)).clamp(min=0.0)
    return -factor * (excess / buffer).clamp(max=1.0)


def rloo_loss(logprobs, old_logprobs, advantages, mask, clip_range: float = 0.2, level: str = "sequence",
              denominator=None):
    """RLOO's clipped objective with leave-one-out advantages [B].

    ``level="sequence"`` (default; Ahmadian et al. 2024, TRL): the response is one action, with one
    ratio ``exp(sum_t log pi - log pi_old)`` clipped per response; the loss is the sum over responses
    divided by ``denominator`` (the loop: the global minibatch's response count over its chunks;
    default: this chunk's). ``"token"``: a ratio per token, clipped per token, summed over real
    tokens and divided by ``denominator`` (the loop: the minibatch's token count over its chunks;
    default: this chunk's token count). On-policy both are REINFORCE with the leave-one-out
    baseline: the gradient is ``sum_i A_i grad log pi(y_i)`` over the response (resp. token) count."""
    m = mask.bool()
    if level == "token":
        tok, stats = clipped_token_losses(logprobs, old_logprobs, advantages, m, clip_range)
        total = torch.where(m, tok, torch.zeros_like(tok)).sum()
        return _over(total, m.sum(), denominator), stats
    if level != "sequence":
        raise ValueError(f"level={level!r}: choose sequence or token")
    logr = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs)).sum(1)
    ratio = torch.exp(logr)
    a = advantages.to(ratio.dtype)
    l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    with torch.no_grad():
        stats = {"clipfrac": (l2 > l1).to(ratio.dtype).mean(), "approxkl": 0.5 * (logr ** 2).mean(),
                 "ratio_mean": ratio.mean()}
    return _over(torch.max(l1, l2).sum(), torch.tensor(m.shape[0]), denominator), stats
