"""Stage 3: PPO against the reward model with a per-token KL penalty to the SFT policy.

Every role lives on one frozen backbone held once in memory:

    reference = [sft]                 frozen: the SFT adapters (never the bare backbone)
    policy    = [policy]              trainable copy of sft
    value     = [value] + value head  trainable; from the reward role (default) or fresh,
                                      or the policy's adapters with its own head (value.share_policy)
    reward    = [reward...] + head    frozen: the trained reward role

One PPO iteration (CleanRL / N+ implementation details; docs/ppo-notes.md §1):

    1. sample responses to left-padded prompts from the policy (KV cache, temperature T, pure sampling)
    2. truncate after the first stop token; score query+response with the reward role at the last
       real token; normalise with the reward stage's statistics; penalise responses with no stop
    3. one batched no-grad forward of policy, reference and value: old log-probs at T, reference
       log-probs at T, values
    4. per-token KL penalty in the reward, score added at the last real token; GAE(gamma, lambda);
       advantages whitened over real tokens
    5. num_ppo_epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss,
       one optimizer step per minibatch (gradient accumulation over micro-batches)
    6. KL controller update; log; checkpoint

``align ppo CONFIG`` writes adapters/policy (peft layout where possible), adapters/value,
heads/value, checkpoints/ (exact resume incl. KL controller and data position), metrics.jsonl,
samples.jsonl and summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Optional

import torch

from align.adapters.base import AdapterConfig
from align.config import ConfigError
from align.guard import check_loss, stage_entry
from align.rl.functional import masked_whiten
from align.rl.gae import compute_gae
from align.rl.kl import make_kl_controller, masked_kl
from align.rl.losses import explained_variance, policy_loss, value_loss
from align.rl.rewards import compute_token_rewards, whiten_rewards
from align.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, OneOf, setting
from align.scoring import response_stats
from align.stages.online import (REWARD_FN_SPEC, OnlineAlgoConfig, OnlineLoop, OnlineStageConfig, Rollout,
                                 build_policy_roles, run_online)

# Where the KL penalty is a per-token reward, only k1's policy gradient is that of KL(pi || ref)
# (docs/objectives.md; tests/test_rl_objectives.py checks each one listed here); k2 and k3 are refused.
REWARD_KL_ESTIMATORS = ("k1",)


@dataclass
class ValueConfig:
    init: str = setting("reward", "reward: copy of the reward role (adapters + head) | fresh", OneOf("reward", "fresh"))
    share_policy: bool = setting(
        False,
        "value head on the policy's adapters instead of its own set (a shared-trunk critic, as Hydra-RLHF): one "
        "backbone pass gives the policy's log-probs and the values, in the rollout and in each update chunk")
    stop_gradient: bool = setting(
        False, "with share_policy: the value loss trains the value head only, not the policy's adapters")
    adapter: Optional[AdapterConfig] = setting(None, "for init=fresh (default: the policy's method and config)")


@dataclass
class PPOAlgoConfig(OnlineAlgoConfig):
    iterations: int = setting(100, "PPO iterations (rollout + update)", AT_LEAST_ONE)
    rollout_batch_size: int = setting(64, "prompts per iteration, over all processes", AT_LEAST_ONE)
    lr: float = setting(1e-4, "peak learning rate (policy; the value too unless value_lr)", POSITIVE)
    kl_coef: float = setting(0.05, "initial beta of the per-token KL penalty in the reward", NON_NEGATIVE)
    num_ppo_epochs: int = setting(4, "passes over each rollout batch", AT_LEAST_ONE)
    value_lr: float = setting(0.0, "peak learning rate of the value's adapters and head (0: lr)", NON_NEGATIVE)
    kl_estimator: str = setting(
        "k1",
        "the per-token KL penalty in the reward: k1 = log pi - log ref; k2 | k3 are refused (as rewards their policy "
        "gradient is not that of KL(pi || ref))",
        OneOf("k1", "k2", "k3"))
    kl_controller: str = setting("fixed", "fixed | adaptive (Ziegler et al.)", OneOf("fixed", "adaptive"))
    kl_target: float = setting(6.0, "adaptive controller's target KL (nats per sequence)", POSITIVE)
    kl_horizon: int = setting(10000, "adaptive controller's horizon (samples)", AT_LEAST_ONE)
    gamma: float = setting(1.0, "GAE discount", UNIT)
    lam: float = setting(0.95, "GAE lambda", UNIT)
    cliprange_value: float = setting(0.2, "value clip around the old values", POSITIVE)
    vf_coef: float = setting(0.1, "value loss weight", NON_NEGATIVE)
    whiten_rewards: bool = setting(False, "whiten the token rewards per batch (off by default)")
    whiten_advantages: bool = setting(True, "whiten advantages over real tokens")

    @property
    def epochs(self) -> int:
        return self.num_ppo_epochs


@dataclass
class PPOConfig(OnlineStageConfig):
    output_dir: str = setting("runs/ppo", "the run directory")
    reward_fn: str = setting(
        "",
        "or a programmatic reward \"module:function(prompts, responses, ended, **columns) -> list[float]\" (then "
        "value.init=fresh): the prompt records' other fields (a reference answer, ...) arrive as keyword arguments "
        "it names",
        REWARD_FN_SPEC)
    value: ValueConfig = field(default_factory=ValueConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)

    SECTION: ClassVar[str] = "ppo"

    def checks(self, at: str) -> Iterator[str]:
        """What every online stage checks, the KL estimator's place and the critic's start."""
        yield from super().checks(at)
        if self.ppo.kl_estimator in ("k2", "k3"):  # valid estimators (align.rl.kl), wrong place
            yield (f"{at}ppo.kl_estimator={self.ppo.kl_estimator!r}: as a per-token penalty in the reward only k1 "
                   f"regularises toward the reference (k2 and k3 as rewards have a policy gradient other than that "
                   f"of KL(pi || ref): Tang & Munos 2025); use k1 (docs/objectives.md)")
        if self.value.stop_gradient and not self.value.share_policy:
            yield (f"{at}value.stop_gradient=true is for value.share_policy=true (a critic with adapters of its own "
                   f"trains them through its loss)")
        if not self.reward_run and (self.reward_fn or self.rewards) and self.value.init == "reward":
            yield f"{at}value.init='reward' needs a learned reward (reward_run); use value.init=fresh with reward_fn"


# ------------------------------------------------------------------------------------ roles
def build_roles(model, cfg: PPOConfig) -> dict:
    """reference, policy, value and reward roles over the one backbone; returns the reward's
    normalisation statistics."""
    reward_stack, norm = build_policy_roles(model, cfg)
    if not cfg.reward_run and cfg.value.init == "reward":
        raise ConfigError("value.init=reward needs a learned reward (reward_run); use value.init=fresh")
    _build_value(model, cfg.value, reward_stack, norm if cfg.ppo.normalize_reward else None)
    return norm


def _copy_reward_head_to_value(model, norm: dict | None) -> None:
    """The value head starts as the reward head, in the units PPO's scores use: with reward
    normalisation ``(r - mean) / std`` is folded into its weight and bias, so the critic's first
    predictions are calibrated to the returns it must fit."""
    model.add_head("value")
    sd = {k: v.clone() for k, v in model.heads["reward"].state_dict().items()}
    if norm is not None:
        sd["linear.weight"] = sd["linear.weight"] / norm["std"]
        sd["linear.bias"] = (sd["linear.bias"] - norm["mean"]) / norm["std"]
    model.heads["value"].load_state_dict(sd)


def _build_value(model, v: ValueConfig, reward_stack, norm: dict | None):
    if v.share_policy:
        value_stack = ["policy"]
        trainable_value = []
        if v.init == "reward":
            _copy_reward_head_to_value(model, norm)
        else:
            model.add_head("value", init="zero")
        model.heads["value"].detach_input = v.stop_gradient
    elif v.init == "reward":
        model.copy_adapter("reward", "value")
        _copy_reward_head_to_value(model, norm)
        value_stack = [a if a != "reward" else "value" for a in reward_stack]
        trainable_value = ["value"]
    elif v.init == "fresh":
        model.add_adapter("value", v.adapter or model.adapters["sft"].config)
        model.add_head("value", init="zero")
        value_stack, trainable_value = ["value"], ["value"]
    else:
        raise ConfigError(f"value.init={v.init!r}: choose reward or fresh")
    model.add_role("value", value_stack, head="value")
    model.set_trainable(["policy", "value", *trainable_value])


def parameter_groups(model, params: list, value_lr: float) -> list:
    """The optimizer's parameters: one group at ``ppo.lr``, or, with ``ppo.value_lr``, the value's own
    adapter set and head in a second group at that rate (as OpenRLHF's and DeepSpeed-Chat's critic
    learning rate). A value head on the policy's adapters (``value.share_policy``) puts only the head
    there: the shared adapters learn at the policy's rate."""
    if not value_lr:
        return params
    own = list(model.adapters["value"].parameters()) if "value" in model.roles["value"].adapters else []
    value_ids = {id(p) for p in own + list(model.heads["value"].parameters())}
    return [{"params": [p for p in params if id(p) not in value_ids]},
            {"params": [p for p in params if id(p) in value_ids], "lr": value_lr}]


def gae_advantages(ro: Rollout, kl_coef: float, a: PPOAlgoConfig) -> dict[str, torch.Tensor]:
    """Per-token KL penalty and rewards, GAE advantages and returns of a (global) rollout batch."""
    kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask, a.kl_estimator)
    rewards, non_score = compute_token_rewards(ro.scores, kl, kl_coef, ro.response_mask, ro.seq_lengths)
    if a.whiten_rewards:
        rewards = whiten_rewards(rewards, ro.response_mask)
    adv, returns = compute_gae(rewards, ro.values, ro.response_mask, a.gamma, a.lam)
    if a.whiten_advantages:
        adv = masked_whiten(adv, ro.response_mask, shift_mean=True)
    return {"kl": kl, "non_score": non_score, "advantages": adv, "returns": returns}


class PPOLoop(OnlineLoop):
    """PPO's hooks: a critic beside the policy, GAE advantages with the KL penalty in the reward,
    the clipped policy and value losses in one forward, an adaptive KL controller."""

    section = "ppo"
    trained = ("policy", "value")

    def build_roles(self) -> dict:
        return build_roles(self.model, self.cfg)

    def optimizer_groups(self, params: list):
        return parameter_groups(self.model, params, self.a.value_lr)

    def kl_controller(self):
        a = self.a
        return make_kl_controller(a.kl_controller, kl_coef=a.kl_coef, target=a.kl_target, horizon=a.kl_horizon)

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        return gae_advantages(ro, self.kl_ctl.value, self.a)

    @property
    def shared_trunk(self) -> bool:
        """The value head reads the policy's adapters (``value.share_policy``): one backbone pass
        serves both roles (``AlignModel.forward(roles=...)``)."""
        roles = self.model.roles
        return roles["value"].adapters == roles["policy"].adapters

    @property
    def separate_backward(self) -> bool:
        """Value and policy forward/backward one after the other (``chunk_loss``): a single process
        without DeepSpeed or FSDP2, where no wrapper needs one forward per backward, and a critic
        with a trunk of its own (a shared trunk runs once for both)."""
        rt = self.rt
        return rt.world_size == 1 and rt.ds is None and rt.fsdp is None and not self.shared_trunk

    def chunk_loss(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor, it: int):
        """Clipped policy loss + vf_coef x clipped value loss. Under DDP, DeepSpeed or FSDP2 both roles
        run in one module call (one forward per backward); in a single plain process the value
        loss's forward and backward run first and the policy's forward after, so the two roles'
        activations are never held together (the same gradients: the roles' parameters are
        disjoint) and only the policy loss is left for the loop's backward."""
        a, rt = self.a, self.rt
        m = ro.response_mask[idx]
        args = (self.engine, ro.query[idx], ro.query_mask[idx], ro.response[idx], ro.response_mask[idx])
        separate, shared = self.separate_backward, a.shares_prompt
        out = response_stats(*args, ("value",) if separate else ("policy", "value"), a.temperature, entropy=True,
                             shared_prompt=shared)
        vf, vf_stats = value_loss(out["value"]["values"], ro.values[idx], adv["returns"][idx], m, a.cliprange_value)
        if separate:
            check_loss(vf, it, self.section, rt, what=" (value loss)")
            rt.accelerator.backward(a.vf_coef * vf)
            out = response_stats(*args, ("policy",), a.temperature, entropy=True, shared_prompt=shared)
        pg, pg_stats = policy_loss(out["policy"]["logprobs"], ro.logprobs[idx], adv["advantages"][idx], m,
                                   a.cliprange)
        vals = {"policy/loss": pg, "value/loss": vf.detach(), **{f"policy/{k}": v for k, v in pg_stats.items()},
                **{f"value/{k}": v for k, v in vf_stats.items()}}
        return (pg if separate else pg + a.vf_coef * vf), vals, out["policy"]["entropy"]

    def extra_metrics(self, ro: Rollout, adv: dict, times: dict) -> dict:
        lrs = self.sched.get_last_lr()
        return {"objective/rlhf_reward": float((ro.scores + adv["non_score"].sum(1)).mean()),
                "objective/non_score_reward": float(adv["non_score"].sum(1).mean()),
                "value/explained_variance": float(explained_variance(ro.values, adv["returns"], ro.response_mask)),
                **({"lr_value": lrs[1]} if len(lrs) > 1 else {})}


@stage_entry
def run(cfg: PPOConfig) -> dict:
    return run_online(cfg, PPOLoop)
