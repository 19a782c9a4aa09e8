"""Critic-free policy optimisation on the same roles as PPO: ``align grpo`` (GRPO, Dr. GRPO) and
``align rloo`` (RLOO).

Both sample ``group_size`` responses per prompt from the policy (a trainable copy of the SFT
adapters), score them with the reward role (or a programmatic ``reward_fn``) and the reference
(the SFT adapters), and take advantages against the other responses to the same prompt
(align/rl/group.py); there is no value head. They run on PPO's machinery (align/stages/ppo.py:
prompt order, rollout and scoring, the minibatch split over processes, exact resume, evaluation,
checkpoints) and differ only in their advantages and loss. Run dirs are laid out as PPO's
(``adapters/policy`` is what ``align eval`` reads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from align.config import (
    ConfigError,
    ModelConfig,
    TrackingConfig,
    validate,
)
from align.rl.functional import masked_mean
from align.rl.group import group_advantages, grpo_loss, rloo_advantages, rloo_loss
from align.rl.kl import make_kl_controller, masked_kl
from align.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, OneOf, Range, Spec, setting
from align.stages.common import backbone_from_run
from align.stages.ppo import (
    PPODataConfig,
    PPOEvalConfig,
    PPOLoop,
    PromptOrder,
    Rollout,
    _TrainView,
    minibatch_split,
    policy_stage_problems,
    recompute_logprobs,
    run_loop,
)
from align.guard import check_loss, stage_entry


@dataclass
class GroupAlgoConfig:
    seed: int = setting(0, "data order; sampling is seeded per response row")
    iterations: int = setting(100, "iterations (rollout + update)", AT_LEAST_ONE)
    rollout_batch_size: int = setting(
        64,
        "responses per iteration over all processes (prompts x group_size)",
        AT_LEAST_ONE)
    group_size: int = setting(4, "responses sampled per prompt (GRPO's G, RLOO's k), >= 2", Range(2, integer=True))
    num_minibatches: int = setting(1, "optimizer steps per epoch", AT_LEAST_ONE)
    num_epochs: int = setting(1, "passes over each rollout batch (1: strictly on-policy)", AT_LEAST_ONE)
    micro_batch_size: int = setting(16, "most rows per process per forward/backward", AT_LEAST_ONE)
    response_length: int = setting(48, "max new tokens per response", AT_LEAST_ONE)
    temperature: float = setting(0.7, "sampling temperature, also applied in every log-prob", POSITIVE)
    rollout_logprobs: str = setting(
        "auto",
        "sample | recompute | auto, as ppo.rollout_logprobs",
        OneOf("auto", "sample", "recompute"))
    lr: float = setting(1e-4, "peak learning rate of the policy", POSITIVE)
    lr_schedule: str = setting("linear", "linear (to 0) | constant", OneOf("linear", "constant"))
    adam_eps: float = setting(1e-5, "AdamW epsilon", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: off)", NON_NEGATIVE)
    kl_coef: float = setting(0.04, "beta of the KL to the reference (SFT) policy", NON_NEGATIVE)
    cliprange: float = setting(0.2, "ratio clip", POSITIVE)
    normalize_reward: bool = setting(True, "(r - mean) / std with the reward stage's statistics")
    missing_stop_penalty: float = setting(-1.0, "a response with no stop token scores this (mode replace)")
    missing_stop_mode: str = setting("replace", "replace | subtract | none", OneOf("replace", "subtract", "none"))
    log_every: int = setting(1, "iterations between logged metrics", AT_LEAST_ONE)
    save_every: int = setting(0, "iterations between checkpoints (0: at the end only)", NON_NEGATIVE)
    keep_checkpoints: int = setting(2, "most recent checkpoints kept", AT_LEAST_ONE)
    stop_after_iterations: int = setting(0, "testing aid: stop as if killed", NON_NEGATIVE)


@dataclass
class GRPOAlgoConfig(GroupAlgoConfig):
    variant: str = setting(
        "grpo",
        "grpo (group std, per-response length mean) | dr_grpo (neither)",
        OneOf("grpo", "dr_grpo"))
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
        if self.kl_estimator == "k1" and self.kl_coef > 0 and not self.kl_importance_weight:
            yield (f"{at}kl_estimator='k1': in the loss k1's expected gradient is zero (E_pi[grad log pi] = 0), so "
                   f"it would not pull toward the reference; use k3 (forward KL, the default), k2 (reverse KL), "
                   f"or k1 with {at}kl_importance_weight=true (docs/objectives.md)")


@dataclass
class RLOOAlgoConfig(GroupAlgoConfig):
    kl_coef: float = setting(0.05, "beta of the per-token KL (k1) subtracted from the reward", NON_NEGATIVE)
    ratio_level: str = setting(
        "sequence",
        "sequence: one ratio per response, clipped per response, mean over responses (the RLOO paper, TRL) | token: "
        "per-token ratio, token mean",
        OneOf("sequence", "token"))


@dataclass
class _GroupStageConfig:
    output_dir: str = setting("", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    sft_run: str = setting("", "the SFT run dir: backbone, reference and initial policy")
    reward_run: str = setting("", "the reward stage's run dir (the learned reward role)")
    reward_fn: str = setting(
        "",
        "or a programmatic reward \"module:function(prompts, responses, ended)\"",
        Spec(args=3, call="fn(prompts, responses, ended)"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PPODataConfig = field(default_factory=PPODataConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    SECTION: ClassVar[str] = ""

    @property
    def algo(self) -> GroupAlgoConfig:
        return getattr(self, self.SECTION)

    def checks(self, at: str) -> Iterator[str]:
        """The run dirs this stage reads, the reward source, the backbone, the groups and the split."""
        yield from policy_stage_problems(self, at, self.SECTION)
        a, s = self.algo, self.SECTION
        if a.group_size >= 2 and a.rollout_batch_size >= 1 and a.rollout_batch_size % a.group_size:
            yield (f"{at}{s}.rollout_batch_size={a.rollout_batch_size} is not a multiple of {s}.group_size="
                   f"{a.group_size} (every prompt gets group_size responses)")

    @property
    def train(self):
        """start_stage reads seed and grad_accum from here (as PPOConfig.train)."""
        try:
            accum = minibatch_split(self.algo, int(os.environ.get("WORLD_SIZE", "1")), self.SECTION).accum_steps
        except ConfigError:
            accum = 1
        return _TrainView(self.algo.seed, accum)


@dataclass
class GRPOConfig(_GroupStageConfig):
    output_dir: str = setting("runs/grpo", "the run directory")
    grpo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)

    SECTION: ClassVar[str] = "grpo"


@dataclass
class RLOOConfig(_GroupStageConfig):
    output_dir: str = setting("runs/rloo", "the run directory")
    rloo: RLOOAlgoConfig = field(default_factory=RLOOAlgoConfig)

    SECTION: ClassVar[str] = "rloo"


class GroupPromptOrder(PromptOrder):
    """``rollout_batch_size / group_size`` prompts per iteration, each repeated ``group_size``
    times in consecutive rows (its group); every row has its own sampling seed."""

    def __init__(self, prompts: list, a: GroupAlgoConfig, rank: int, world: int):
        self.group = a.group_size
        n_prompts = a.rollout_batch_size // a.group_size
        if len(prompts) < n_prompts:
            raise ConfigError(f"{len(prompts)} training prompts cannot fill one batch of {n_prompts} prompts "
                              f"(rollout_batch_size / group_size)")
        self.prompts, self.a, self.batch = prompts, a, a.rollout_batch_size
        self.n_prompts, self.steps_per_epoch = n_prompts, len(prompts) // n_prompts
        local = self.batch // world
        self.rows = range(rank * local, (rank + 1) * local)

    def __call__(self, it: int) -> tuple[list, list[int], int]:
        epoch, idx = divmod(it, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=g)[idx * self.n_prompts:(idx + 1) * self.n_prompts]
        width = max(len(self.prompts[i]["ids"]) for i in perm.tolist())
        seeds = [self.a.seed * 7_919_000 + it * self.batch + r for r in self.rows]
        return [self.prompts[perm[r // self.group]] for r in self.rows], seeds, width


class GroupLoop(PPOLoop):
    """PPO's loop without a critic: group-relative advantages and the method's own loss."""
    with_value = False

    def prompt_order(self, prompts: list) -> PromptOrder:
        return GroupPromptOrder(prompts, self.a, self.rt.rank, self.rt.world_size)

    def epochs(self) -> int:
        return self.a.num_epochs

    def optimizer_groups(self, params: list):
        return params

    def kl_controller(self):
        return make_kl_controller("fixed", kl_coef=self.a.kl_coef)

    def denominator(self, ro: Rollout, minibatch: torch.Tensor, tokens: bool = False) -> float:
        """A chunk's share of its global minibatch's response (or token) count: a chunk's loss is
        its sum divided by this, so that after accelerate's division by the accumulation steps and
        the mean over processes the minibatch's loss is its plain mean, however the minibatch is
        cut into chunks (``MinibatchSplit``)."""
        count = float(ro.response_mask[minibatch].sum()) if tokens else float(len(minibatch))
        return count / (self.split.accum_steps * self.split.world)

    def train_chunk(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor,
                    it: int) -> dict[str, float]:
        a, rt = self.a, self.rt
        with rt.accelerator.accumulate(self.engine):
            from align.scoring import response_stats
            out = response_stats(self.engine, ro.query[idx], ro.query_mask[idx], ro.response[idx],
                                 ro.response_mask[idx], ("policy",), a.temperature)["policy"]
            loss, stats = self.loss(out["logprobs"], ro, adv, idx, minibatch)
            check_loss(loss, it, self.section, rt)
            rt.accelerator.backward(loss)  # accelerate divides by the accumulation steps
            if rt.accelerator.sync_gradients:
                if a.max_grad_norm > 0:
                    rt.accelerator.clip_grad_norm_(self.params, a.max_grad_norm)
                self.optimizer.step()
                self.sched.step()
                self.optimizer.zero_grad(set_to_none=True)
        vals = {"policy/loss": loss, **{f"policy/{k}": v for k, v in stats.items()}}
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in vals.items()}

    def metrics(self, ro: Rollout, adv: dict, stats: dict, mean_kl: float, times: dict) -> dict:
        tokens = float(ro.response_mask.sum())
        logs = {
            "objective/kl": mean_kl, "objective/kl_coef": self.kl_ctl.value,
            "objective/scores": float(ro.scores.mean()), "objective/raw_scores": float(ro.raw_scores.mean()),
            "objective/advantage_abs": float(adv["advantages"].abs().mean()),
            "policy/entropy_rollout": float(masked_mean(-ro.logprobs, ro.response_mask)),
            "response/length": float(ro.response_mask.sum(1).float().mean()),
            "response/stop_rate": float(ro.has_stop.float().mean()), "lr": self.sched.get_last_lr()[0],
            "throughput/generated_tokens_per_s": tokens / max(times["generate"], 1e-9),
            "time/rollout_s": times["rollout"], "time/generate_s": times["generate"], "time/update_s": times["update"],
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        return self.rt.mean_across(logs)


class GRPOLoop(GroupLoop):
    section = "grpo"

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        a = self.a
        # logged as objective/kl: the sampled sequence KL(pi || pi_ref) (k1 summed), whatever the loss's estimator
        kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask)
        return {"kl": kl, "advantages": group_advantages(ro.scores, a.group_size, scale=a.variant == "grpo")}

    def loss(self, logprobs, ro: Rollout, adv: dict, idx, minibatch):
        a = self.a
        return grpo_loss(logprobs, ro.logprobs[idx], ro.ref_logprobs[idx], adv["advantages"][idx],
                         ro.response_mask[idx], a.cliprange, a.kl_coef, a.kl_estimator, a.variant, a.response_length,
                         a.kl_importance_weight, self.denominator(ro, minibatch))


class RLOOLoop(GroupLoop):
    section = "rloo"

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        a = self.a
        kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask)
        rewards = ro.scores - a.kl_coef * kl.sum(1)
        return {"kl": kl, "advantages": rloo_advantages(rewards, a.group_size)}

    def loss(self, logprobs, ro: Rollout, adv: dict, idx, minibatch):
        a = self.a
        return rloo_loss(logprobs, ro.logprobs[idx], adv["advantages"][idx], ro.response_mask[idx], a.cliprange,
                         a.ratio_level, self.denominator(ro, minibatch, tokens=a.ratio_level == "token"))


def _run(cfg: _GroupStageConfig, loop_cls) -> dict:
    validate(cfg)  # every key, file and run dir, before the run directory is written
    recompute_logprobs(cfg.algo.rollout_logprobs, cfg.model.dtype)
    backbone = cfg.model.path or backbone_from_run(cfg.sft_run)["path"]
    split = minibatch_split(cfg.algo, int(os.environ.get("WORLD_SIZE", "1")), cfg.SECTION)
    return run_loop(loop_cls, cfg, backbone, split)


@stage_entry
def run(cfg: GRPOConfig) -> dict:
    """``align grpo``: GRPO or Dr. GRPO (``grpo.variant``)."""
    return _run(cfg, GRPOLoop)


@stage_entry
def run_rloo(cfg: RLOOConfig) -> dict:
    """``align rloo``: RLOO with the KL penalty in the reward."""
    return _run(cfg, RLOOLoop)
