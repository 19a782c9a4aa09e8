"""Per-token KL estimators and the KL-coefficient controllers (docs/ppo-notes.md §E1, §E2).

Notation: actions a_t are sampled from the policy pi; ``logr = log pi(a_t) - log pi_ref(a_t)``.
The quantity estimated is the reverse KL of the RLHF objective, KL(pi || pi_ref) = E_pi[logr]
(summed over a response's tokens it is the sequence KL, logged as ``objective/kl``).
"""
from __future__ import annotations

import torch


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-sample estimate of KL(pi || pi_ref) at each sampled token: [B, T] x [B, T] -> [B, T].

    With logr = logprobs - ref_logprobs (Schulman, "Approximating KL divergence", 2020):
      * k1 = logr. Unbiased (E_pi[logr] = KL); a single sample can be negative. N+/2019 default.
      * k2 = logr^2 / 2. Always >= 0, low variance, biased (exact to second order for pi ~ pi_ref).
      * k3 = (rho - 1) - log rho with rho = pi_ref(a)/pi(a) = exp(-logr), i.e.
        k3 = exp(-logr) - 1 + logr. Unbiased: E_pi[rho] = sum_a pi_ref(a) = 1, so E_pi[rho - 1] = 0
        and E[k3] = E[-log rho] = E[logr] = KL. Always >= 0 because e^u >= 1 + u (u = -logr).
        TRL's ``kl_estimator="k3"`` writes it with its own logr' = ref - logp as
        (exp(logr') - 1) - logr'; the same number.
    All three are exactly 0 where logprobs == ref_logprobs. Masking is left to the caller.
    """
    logr = logprobs - ref_logprobs
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr ** 2
    if estimator == "k3":
        return torch.expm1(-logr) + logr  # expm1: exact near logr = 0
    raise ValueError(f"kl_estimator={estimator!r}: choose k1, k2 or k3")


def masked_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
              estimator: str = "k1") -> torch.Tensor:
    """``kl_per_token`` on real tokens and exactly 0 on padding (``torch.where``, so a -inf or NaN
    log-prob in a padded slot cannot turn into NaN as ``kl * mask`` would)."""
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    m = mask.bool()
    return torch.where(m, kl, torch.zeros_like(kl))


class FixedKLController:
    """Constant KL coefficient beta (N+: 0.05; InstructGPT: 0.02). ``value`` is a python float."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same interface as AdaptiveKLController)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 (2019 code ``AdaptiveKLController``; 2019 defaults: 0.15, 6, 10000).

    update: err = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + err * n_steps / horizon,
    where current_kl is the mean *sequence* KL of the batch and n_steps the number of episodes in
    it (the batch size). State is one python float, so a resumed run continues bit-exactly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.value *= 1.0 + err * float(n_steps) / self.horizon


def make_kl_controller(kind: str, kl_coef: float, target: float = 6.0, horizon: int = 10000):
    """``"fixed"`` -> FixedKLController(kl_coef); ``"adaptive"`` -> AdaptiveKLController(kl_coef,
    target, horizon) with kl_coef as the initial coefficient."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"kl_controller={kind!r}: choose fixed or adaptive")
