"""``align rloo``: RLOO (Ahmadian et al. 2024) on the online roles without a critic.

``rloo.group_size`` responses per prompt, the per-token KL penalty (k1) subtracted from each
response's reward, a leave-one-out baseline (align/rl/group.py), and a clipped ratio per response
(``rloo.ratio_level=sequence``, the paper's and TRL's) or per token. The rollout, the minibatch
split, resume, evaluation and checkpoints are the online loop's (align/stages/online.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from align.guard import stage_entry
from align.rl.group import rloo_advantages, rloo_loss
from align.rl.kl import masked_kl
from align.rules import NON_NEGATIVE, OneOf, setting
from align.stages.online import GroupAlgoConfig, GroupLoop, OnlineStageConfig, Rollout, run_online


@dataclass
class RLOOAlgoConfig(GroupAlgoConfig):
    kl_coef: float = setting(0.05, "beta of the per-token KL (k1) subtracted from the reward", NON_NEGATIVE)
    ratio_level: str = setting(
        "sequence",
        "sequence: one ratio per response, clipped per response, mean over responses (the RLOO paper, TRL) | token: "
        "per-token ratio, token mean",
        OneOf("sequence", "token"))


@dataclass
class RLOOConfig(OnlineStageConfig):
    output_dir: str = setting("runs/rloo", "the run directory")
    rloo: RLOOAlgoConfig = field(default_factory=RLOOAlgoConfig)

    SECTION: ClassVar[str] = "rloo"


class RLOOLoop(GroupLoop):
    section = "rloo"

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask)
        rewards = ro.scores - self.kl_ctl.value * kl.sum(1)
        return {"kl": kl, "advantages": rloo_advantages(rewards, self.a.group_size)}

    def loss(self, logprobs, ro: Rollout, adv: dict, idx, minibatch):
        a = self.a
        return rloo_loss(logprobs, ro.logprobs[idx], adv["advantages"][idx], ro.response_mask[idx], a.cliprange,
                         a.ratio_level, self.denominator(ro, minibatch, tokens=a.ratio_level == "token"))


@stage_entry
def run(cfg: RLOOConfig) -> dict:
    """``align rloo``: RLOO with the KL penalty in the reward."""
    return run_online(cfg, RLOOLoop)
