"""``align grpo``: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), DAPO (Yu et al. 2025) with
dynamic sampling and the soft overlong penalty, and GSPO's sequence-level ratio (Zheng et al. 2025)
on the online roles without a critic.

``grpo.group_size`` responses per prompt from the policy (a trainable copy of the SFT adapters),
scored by the reward role (or a programmatic ``reward_fn``); advantages against the other
responses to the same prompt (align/rl/group.py); the KL to the reference (the SFT adapters) in
the loss. The rollout, the minibatch split, resume, evaluation and checkpoints are the online loop's
(align/stages/online.py); run dirs are laid out as PPO's (``adapters/policy`` is what
``align eval`` reads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from align.guard import stage_entry
from align.rl.group import group_advantages, grpo_loss
from align.rl.kl import masked_kl
from align.rules import NON_NEGATIVE, OneOf, setting
from align.stages.online import GroupAlgoConfig, GroupLoop, OnlineStageConfig, Rollout, run_online


@dataclass
class GRPOAlgoConfig(GroupAlgoConfig):
    loss_type: str = setting(
        "grpo",
        "grpo (group std, per-response length mean) | dr_grpo (neither: sum / response_length) | dapo (group std, "
        "every token of the minibatch weighs the same) | bnpo (group std, token mean of each micro-batch) -- TRL's "
        "loss_type",
        OneOf("grpo", "dr_grpo", "dapo", "bnpo"))
    scale_rewards: str = setting(
        "auto",
        "divide each group's advantages by the group's reward std: group | none | auto (group for grpo, dapo and "
        "bnpo; none for dr_grpo) -- TRL's scale_rewards. Mixing the learned reward with a verifier: none "
        "(docs/verifiers.md)",
        OneOf("auto", "group", "none"))
    cliprange_high: float = setting(
        0.0, "upper ratio clip (clip-higher; DAPO: 0.28); 0: cliprange, symmetric", NON_NEGATIVE)
    ratio_level: str = setting(
        "token",
        "token: a ratio per token (GRPO) | sequence: one ratio per response, exp(mean log pi/pi_old), clipped per "
        "response (GSPO)",
        OneOf("token", "sequence"))
    mask_truncated: bool = setting(
        False, "responses that hit response_length without a stop token add nothing to the loss (DAPO)")
    kl_estimator: str = setting(
        "k3",
        "the KL term in the loss: k3 (DeepSeekMath, TRL): gradient of the forward KL(ref || pi) | k2: of the reverse "
        "KL(pi || ref) | k1: only with kl_importance_weight (alone its expected gradient is 0)",
        OneOf("k1", "k2", "k3"))
    kl_importance_weight: bool = setting(
        False,
        "multiply the KL term by pi / pi_old with its gradient (TRL's use_bias_correction_kl): unbiased over epochs "
        "and minibatches, and k1 / k3 then give the gradient of the reverse KL(pi || ref)")

    def checks(self, at: str) -> Iterator[str]:
        yield from super().checks(at)
        if self.kl_estimator == "k1" and self.kl_coef > 0 and not self.kl_importance_weight:
            yield (f"{at}kl_estimator='k1': in the loss k1's expected gradient is zero (E_pi[grad log pi] = 0), so "
                   f"it would not pull toward the reference; use k3 (forward KL, the default), k2 (reverse KL), "
                   f"or k1 with {at}kl_importance_weight=true (docs/objectives.md)")


@dataclass
class GRPOConfig(OnlineStageConfig):
    output_dir: str = setting("runs/grpo", "the run directory")
    grpo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)

    SECTION: ClassVar[str] = "grpo"


def scales_by_group_std(a: GRPOAlgoConfig) -> bool:
    """Whether advantages are divided by their group's reward std (``scale_rewards``; auto: all but dr_grpo)."""
    return a.scale_rewards == "group" or (a.scale_rewards == "auto" and a.loss_type != "dr_grpo")


def mixed_reward_warning(cfg: GRPOConfig) -> str | None:
    """A warning when the learned reward is mixed with other sources under std-scaled advantages: in a
    group that a verifier judges alike, the division inflates the learned reward's small differences
    to full size (docs/verifiers.md; on SmolLM2 the same mix gained nothing under dapo and +15.4 points
    of correct answers under dr_grpo)."""
    has_role = any(isinstance(r, dict) and "role" in r for r in cfg.rewards)
    if not has_role or len(cfg.rewards) < 2 or not scales_by_group_std(cfg.grpo):
        return None
    return ("[grpo] warning: the learned reward is mixed with other rewards and each group's advantages are divided "
            f"by the group's std (loss_type={cfg.grpo.loss_type}, scale_rewards={cfg.grpo.scale_rewards}); in groups "
            "a verifier judges alike that inflates the learned reward's small differences. Consider "
            "grpo.scale_rewards=none or loss_type=dr_grpo (docs/verifiers.md)")


class GRPOLoop(GroupLoop):
    section = "grpo"

    def __init__(self, cfg: GRPOConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        if (msg := mixed_reward_warning(cfg)) is not None:
            self.rt.print(msg)

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        # logged as objective/kl: the sampled sequence KL(pi || pi_ref) (k1 summed), whatever the loss's estimator
        kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask)
        return {"kl": kl, "advantages": group_advantages(ro.scores, self.a.group_size,
                                                         scale=scales_by_group_std(self.a))}

    def loss(self, logprobs, ro: Rollout, adv: dict, idx, minibatch):
        a = self.a
        return grpo_loss(logprobs, ro.logprobs[idx], ro.ref_logprobs[idx], adv["advantages"][idx],
                         ro.response_mask[idx], a.cliprange, self.kl_ctl.value, a.kl_estimator, a.loss_type,
                         a.response_length, a.kl_importance_weight,
                         self.denominator(ro, minibatch, tokens=a.loss_type == "dapo",
                                          ended_only=a.loss_type == "dapo" and a.mask_truncated),
                         clip_high=a.cliprange_high or None, ratio_level=a.ratio_level,
                         truncated=~ro.has_stop[idx] if a.mask_truncated else None)


@stage_entry
def run(cfg: GRPOConfig) -> dict:
    """``align grpo``: GRPO, Dr. GRPO, DAPO or BNPO (``grpo.loss_type``)."""
    return run_online(cfg, GRPOLoop)
