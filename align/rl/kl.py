"""Per-token KL estimators and the KL-coefficient controllers."""
from __future__ import annotations

import torch


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Estimates of KL(pi || pi_ref) per sampled token, with logr = log pi - log pi_ref:
    k1 = logr (unbiased, can be negative); k2 = logr^2 / 2; k3 = exp(-logr) - 1 + logr (unbiased,
    always >= 0; Schulman's estimator, TRL's kl_estimator="k3")."""
    logr = logprobs - ref_logprobs
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr ** 2
    if estimator == "k3":
        return torch.expm1(-logr) + logr
    raise ValueError(f"kl_estimator={estimator!r}: choose k1, k2 or k3")


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = float(s["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: err = clip(KL/target - 1, -0.2, 0.2); coef *= 1 + err * n_steps / horizon,
    with KL the mean sequence KL and n_steps the number of episodes in the batch."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


def make_kl_controller(kind: str, kl_coef: float, target: float = 6.0, horizon: int = 10000):
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"kl_controller={kind!r}: choose fixed or adaptive")
