"""Masked statistics and log-probabilities for PPO-RLHF.

Shapes: B = batch (episodes), T = response tokens, V = vocabulary. A ``mask`` is a bool (or 0/1)
tensor broadcastable to ``x`` that is True on real response tokens and False on padding.
Conventions follow N+ (Huang et al. 2024, ``summarize_from_feedback_details``) and the 2019
reproduction (``lm-human-preference-details``); see docs/ppo-notes.md §E3, §F2.
"""
from __future__ import annotations

import torch


def _as_bool_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.bool().expand_as(x)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is True.

    x: any shape; mask: broadcastable to x. dim=None: scalar over all real entries; dim=d: mean
    along d. Masked entries are excluded with ``torch.where`` (not multiplied by 0), so NaN/inf in
    padding cannot leak in. An all-masked reduction gives 0 (denominator clamped to 1).
    """
    m = _as_bool_mask(mask, x)
    kept = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return kept.sum() / m.sum().clamp(min=1)
    return kept.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the real entries of ``x`` (scalar).

    Biased by default (divide by n): TF ``tf.nn.moments`` semantics used by the 2019 code and N+.
    ``unbiased=True`` applies Bessel's n/(n-1) (left as the biased value when n <= 1).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # biased variance
    if unbiased:
        n = _as_bool_mask(mask, x).sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` with statistics over its real entries: (x - mean) * rsqrt(var + 1e-8).

    Biased variance, 1e-8 inside the rsqrt (N+ ``masked_whiten``). ``shift_mean=False`` adds the
    mean back after scaling, ``(x - mean) / std + mean``: the spread becomes 1 and the mean is kept
    (N+ and TRL's ``whiten(shift_mean=False)``; note this is not ``x / std``): used for rewards
    (2019 E3); advantages use True (F2). Output has x's shape, with masked positions set to 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_as_bool_mask(mask, x), whitened, torch.zeros_like(whitened))


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # at least float32 (bf16/fp16 logits are upcast; float64 is kept)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits / temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``: logits [B,T,V], tokens [B,T] -> [B,T].

    Computed as gather(z) - logsumexp(z) with z = logits / temperature in >= float32 (equal to
    ``log_softmax(z).gather``, one [B,T,V] temporary fewer). The same temperature must be used
    for rollout, reference and training forwards (docs/ppo-notes.md §B4). N+ divides by T + 1e-7; we
    divide by exactly T (consistent everywhere, so ratio = 1 and KL = 0 at step 0 still hold).
    """
    z = _tempered(logits, temperature)
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature): [..., V] -> [...] (nats, >= float32).

    H = -sum_v p_v log p_v; zero-probability entries (e.g. -inf logits) contribute 0, not NaN.
    """
    logp = torch.log_softmax(_tempered(logits, temperature), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def first_true_indices(bools: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """Index of the first True along the last dim: [..., T] -> [...]; T where a row has none.

    Same contract as N+ ``first_true_indices`` (used for the stop-token position).
    """
    t = bools.shape[-1]
    if t == 0:
        return torch.zeros(bools.shape[:-1], dtype=dtype, device=bools.device)
    idx = torch.arange(t, device=bools.device).expand(bools.shape)
    return torch.where(bools.bool(), idx, torch.full_like(idx, t)).min(-1).values.to(dtype)
