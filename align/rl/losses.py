"""Every loss align trains with.

PPO's clipped losses (Schulman et al. 2017; value clipping as in baselines ppo2):
docs/ppo-notes.md §F3, §F4. The SFT next-token loss (``lm_loss``, and ``lm_loss_at`` over the
labelled positions only). The reward model's K-wise ranking loss (InstructGPT; ``kwise_loss``).
DPO on pairs and K-wise rankings (``dpo_loss``: sigmoid, IPO, conservative label smoothing;
``plackett_luce_loss``: listwise).

All inputs are [B, T] per response token, aligned to the action index; ``mask`` is True on real
tokens. Losses are masked means over tokens (N+); stats are detached scalars.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------------------ supervised losses
IGNORE = -100  # label of a position without loss (align.data.sft.IGNORE)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over labelled positions; returns (loss, token count)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = (shift_labels != IGNORE).sum()
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum")
    return loss / n.clamp(min=1), n


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the positions whose next-token prediction is labelled (the only positions
    whose logits a loss needs; ``AlignModel.forward(logits_at=...)`` computes just those)."""
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != IGNORE
    return sel


def lm_loss_at(logits: torch.Tensor, labels: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss`` from the logits [N, V] at ``sel`` = ``label_positions(labels)`` only: the same
    value, without a [B, T, V] tensor for the prompt and padding positions."""
    targets = labels[:, 1:][sel[:, :-1]]
    n = torch.tensor(targets.numel(), device=labels.device)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss / n.clamp(min=1), n


# ------------------------------------------------------------------------------ reward model
def ranking_pairs(ranks: torch.Tensor, group: torch.Tensor, ties: str = "skip"):
    """All ordered (better, worse) index pairs inside each group; tied pairs when ties='half'."""
    same = group[:, None] == group[None, :]
    better = same & (ranks[:, None] < ranks[None, :])
    i, j = better.nonzero(as_tuple=True)
    if ties == "half":
        tied = same & (ranks[:, None] == ranks[None, :])
        tied = torch.triu(tied, diagonal=1)
        ti, tj = tied.nonzero(as_tuple=True)
        return i, j, ti, tj
    if ties != "skip":
        raise ValueError(f"ties={ties!r}: choose skip or half")
    return i, j, i[:0], j[:0]


def counts_in_loss(ranks, ties: str = "skip") -> float:
    """1 when a ranked group takes part in ``kwise_loss`` / ``dpo_loss`` (it has an ordered pair,
    or, with ``ties='half'``, any pair), 0 when it has none (all tied): the unit the losses'
    denominator counts (``_group_mean``)."""
    ranks = list(ranks)
    if ties == "half":
        return 1.0 if len(ranks) >= 2 else 0.0
    return 1.0 if len(set(ranks)) >= 2 else 0.0


def kwise_loss(rewards: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor, n_groups: int,
               margin: torch.Tensor | None = None, weight: torch.Tensor | None = None,
               ties: str = "skip", center_coef: float = 0.0,
               norm: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """InstructGPT's loss: per group, the mean over its C(K,2) ordered pairs of
    ``-log sigmoid(r_better - r_worse - margin)``; then the weighted mean over groups (each group's
    loss times its weight, summed, over the group count: ``_group_mean``).
    With ``ties='half'`` a tied pair contributes the Bradley-Terry loss with target 1/2.

    ``center_coef`` adds reward centering (Eisenstein et al. 2023; TRL's
    ``center_rewards_coefficient``) to each group's loss: ``center_coef * (sum_k r_k)^2``, the squared
    sum of the group's rewards. For a pair that is TRL's ``(r_chosen + r_rejected)^2 = 4 s^2``
    (s the pair's mid-point): it pins the rewards' level and leaves their difference, which the
    Bradley-Terry term trains, alone. For K completions it is ``K^2 * mean_k(r_k)^2``.

    ``norm``: the denominator of the weighted sum over groups (see ``_group_mean``); None: this
    batch's own count of groups."""
    i, j, ti, tj = ranking_pairs(ranks, group, ties)
    d = rewards[i] - rewards[j]
    if margin is not None:
        d = d - margin[group[i]]
    pair_loss = -F.logsigmoid(d)
    gidx = group[i]
    if len(ti):
        dt = rewards[ti] - rewards[tj]
        pair_loss = torch.cat([pair_loss, -(0.5 * F.logsigmoid(dt) + 0.5 * F.logsigmoid(-dt))])
        gidx = torch.cat([gidx, group[ti]])
    extra = None
    if center_coef:
        sums = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, group, rewards)
        extra = center_coef * sums ** 2
    loss = _group_mean(pair_loss, gidx, n_groups, weight, norm, extra)
    with torch.no_grad():
        acc = (rewards[i] > rewards[j]).float().mean() if len(i) else torch.tensor(0.0)
    return loss, {"accuracy": acc, "pairs": float(len(i)), "margin": d.detach().mean() if len(i) else 0.0}


# ------------------------------------------------------------------------------ DPO
def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of each completion: ``beta * (log pi(y|x) - log pi_ref(y|x))`` (summed
    sequence log-probs)."""
    return beta * (policy_logps - ref_logps)


def dpo_pair_loss(h: torch.Tensor, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses from ``h = (logpi_w - logref_w) - (logpi_l - logref_l)`` (better w, worse l):

    * ``sigmoid`` (Rafailov et al. 2023), with conservative DPO's label smoothing eps:
      ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` (eps = 0: plain DPO);
    * ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``; ``dpo_loss`` decides whether the
      log-ratios in ``h`` are per-token means (default) or sums.
    """
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"DPO pair loss {kind!r}: choose sigmoid or ipo")


def _group_mean(values: torch.Tensor, gidx: torch.Tensor, n_groups: int, weight: torch.Tensor | None,
                norm: float | torch.Tensor | None = None, extra: torch.Tensor | None = None):
    """Mean of ``values`` inside each group (plus ``extra[g]``, a per-group term, when given), times
    the group's weight, summed over the groups that have any value and divided by ``norm``.

    A record's weight scales its loss: weight 3 counts as three records of weight 1 in every batch,
    also a batch of one. ``norm=None`` divides by the number of groups that have a value here (the
    mean over groups when every weight is 1). A training step passes its *global* batch's count
    split over its micro-batches and processes (``Trainer``: ``N / (grad_accum * world)``), so the
    gradient of a step is ``sum_g w_g grad L_g / N`` however the global batch is cut."""
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, gidx, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, gidx, torch.ones_like(values))
    has = counts > 0
    per_group = sums[has] / counts[has]
    if extra is not None:
        per_group = per_group + extra[has]
    w = weight[has].to(values.dtype) if weight is not None else torch.ones_like(per_group)
    return (per_group * w).sum() / _denominator(norm, has.sum(), values)


def _denominator(norm, count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    d = count.to(like.dtype) if norm is None else torch.as_tensor(norm, dtype=like.dtype, device=like.device)
    return d.clamp(min=1e-8) if norm is not None else d.clamp(min=1)


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor,
             n_groups: int, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0,
             weight: torch.Tensor | None = None, norm: float | torch.Tensor | None = None,
             lengths: torch.Tensor | None = None, ipo_logps: str = "mean") -> tuple[torch.Tensor, dict]:
    """DPO over prompt groups (pairs are groups of K = 2): per group, the mean of ``dpo_pair_loss``
    over all its ordered (better, worse) pairs (ties skipped), then the weighted sum over groups
    divided by ``norm`` (default: their count; see ``_group_mean``), so a prompt counts as one
    unit whatever its K (as ``kwise_loss`` does for the reward model). ``kind="plackett_luce"``
    takes ``plackett_luce_loss`` instead. Inputs are [N] per completion: summed log-probs under
    the policy (with gradient) and the reference.

    IPO with ``ipo_logps="mean"`` (default) divides each completion's log-ratio by its token count
    ``lengths`` before taking ``h`` (TRL's IPO, the form agreed with the IPO authors): beta then
    means the same for short and long completions. ``"sum"`` uses the summed log-ratios of Azar et
    al. eq. 17 literally.

    Stats (detached, over pairs): ``accuracy`` (implicit reward of the better > the worse, a tie
    counted 1/2), ``margin`` (mean reward difference), ``rewards/chosen`` and ``rewards/rejected``
    (mean implicit reward of the better / worse side), ``logps/chosen``, ``logps/rejected``."""
    if kind == "plackett_luce":
        loss = plackett_luce_loss(policy_logps, ref_logps, ranks, group, n_groups, beta, weight, norm)
    else:
        i, j, _, _ = ranking_pairs(ranks, group)
        logratio = policy_logps - ref_logps
        if kind == "ipo" and ipo_logps == "mean":
            if lengths is None:
                raise ValueError("IPO with per-token mean log-ratios needs each completion's length")
            logratio = logratio / lengths.to(logratio.dtype).clamp(min=1)
        elif kind == "ipo" and ipo_logps != "sum":
            raise ValueError(f"ipo_logps={ipo_logps!r}: choose mean or sum")
        h = logratio[i] - logratio[j]
        loss = _group_mean(dpo_pair_loss(h, beta, kind, label_smoothing), group[i], n_groups, weight, norm)
    return loss, dpo_stats(policy_logps, ref_logps, ranks, group, beta)


@torch.no_grad()
def dpo_stats(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor,
              beta: float) -> dict:
    i, j, _, _ = ranking_pairs(ranks, group)
    r = implicit_rewards(policy_logps.detach().float(), ref_logps.float(), beta)
    if not len(i):
        z = r.new_tensor(0.0)
        return {"accuracy": z, "margin": z, "rewards/chosen": z, "rewards/rejected": z,
                "logps/chosen": z, "logps/rejected": z, "pairs": 0.0}
    d = r[i] - r[j]
    lp = policy_logps.detach().float()
    return {"accuracy": ((d > 0).float() + 0.5 * (d == 0).float()).mean(), "margin": d.mean(),
            "rewards/chosen": r[i].mean(), "rewards/rejected": r[j].mean(),
            "logps/chosen": lp[i].mean(), "logps/rejected": lp[j].mean(), "pairs": float(len(i))}


def plackett_luce_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor,
                       group: torch.Tensor, n_groups: int, beta: float,
                       weight: torch.Tensor | None = None, norm: float | torch.Tensor | None = None) -> torch.Tensor:
    """Listwise DPO (Rafailov et al. 2023, App. A.3): per group, the negative log-likelihood of its
    ranking under the Plackett-Luce model with the implicit rewards r = beta (logpi - logref),
    ``-sum_k [r_k - logsumexp({r_k} u {r_j : rank_j > rank_k})]`` over every completion that has a
    strictly worse one (for a strict order: the usual K - 1 terms, the best chosen from all, the
    next from the rest, ...; tied completions do not compete with each other). For K = 2 it is
    the sigmoid DPO loss. Then the (weighted) mean over groups."""
    r = implicit_rewards(policy_logps, ref_logps, beta)
    same = group[:, None] == group[None, :]
    worse = same & (ranks[None, :] > ranks[:, None])          # [k, j]: j strictly worse than k
    has = worse.any(1)
    pool = worse | torch.eye(len(r), dtype=torch.bool, device=r.device)
    neg = torch.finfo(r.dtype).min
    lse = torch.logsumexp(torch.where(pool, r[None, :].expand(len(r), -1), torch.full_like(r[None, :], neg)), 1)
    terms = (lse - r)[has]
    sums = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add(0, group[has], terms)
    counted = torch.zeros(n_groups, dtype=torch.bool, device=r.device)
    counted[group[has]] = True
    w = weight[counted].to(r.dtype) if weight is not None else torch.ones_like(sums[counted])
    return (sums[counted] * w).sum() / _denominator(norm, counted.sum(), r)
