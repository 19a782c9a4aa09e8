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

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from align.adapters.base import AdapterConfig
from align.adapters.peft_format import load_adapter, save_adapter, save_head
from align.config import (ConfigError, ModelConfig, TrackingConfig, backbone_problems, require_file,
                          run_dir_problems, validate)
from align.rules import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, Exists, OneOf, Spec, setting
from align.data.common import check_eval_split, read_records, require_records, split_by_prompt
from align.data.sft import encode_prompts
from align.rl.functional import entropy_from_logits, masked_mean, masked_whiten
from align.rl.gae import compute_gae
from align.rl.kl import make_kl_controller, masked_kl
from align.rl.losses import explained_variance, policy_loss, value_loss
from align.rl.rewards import compute_token_rewards, whiten_rewards
from align.rl.rollout import apply_missing_stop_penalty
from align.scoring import (decode, evaluate_role, generate, load_callable, load_reward_role, response_stats,
                           score)
from align.stages.common import backbone_from_run, finish_stage, start_stage
from align.resume import prepare_resumable, save_resumable
from align.trainer import make_optimizer, make_scheduler
from align.guard import NonFiniteError, agree, check_loss, check_rewards, mark_started, stage_entry


# Where the KL penalty is a per-token reward, only k1's policy gradient is that of KL(pi || ref)
# (docs/objectives.md; tests/test_rl_objectives.py checks each one listed here); k2 and k3 are refused.
REWARD_KL_ESTIMATORS = ("k1",)


@dataclass
class PPODataConfig:
    prompts: str = setting(
        "",
        "records with a \"prompt\" (other fields ignored)",
        Exists(required=True, what="a records file with prompts"))
    eval_prompts: str = setting("", "held-out prompts; else eval_fraction of prompts", Exists())
    eval_fraction: float = setting(0.05, "held-out share of prompts when eval_prompts is empty", FRACTION)
    max_prompt_length: int = setting(256, "longer prompts keep their last tokens", AT_LEAST_ONE)
    chat_template: Optional[str] = setting(None, "Jinja template for tokenizers without one")
    chat: bool = setting(False, "plain-text prompts/completions as a user and an assistant turn (chat template)")


@dataclass
class ValueConfig:
    init: str = setting("reward", "reward: copy of the reward role (adapters + head) | fresh", OneOf("reward", "fresh"))
    share_policy: bool = setting(False, "value head on the policy's adapters instead of its own set")
    adapter: Optional[AdapterConfig] = setting(None, "for init=fresh (default: the policy's method and config)")


@dataclass
class PPOAlgoConfig:
    seed: int = setting(0, "data order; sampling is seeded per prompt row")
    iterations: int = setting(100, "PPO iterations (rollout + update)", AT_LEAST_ONE)
    rollout_batch_size: int = setting(64, "prompts per iteration, over all processes", AT_LEAST_ONE)
    num_minibatches: int = setting(1, "optimizer steps per PPO epoch", AT_LEAST_ONE)
    num_ppo_epochs: int = setting(4, "passes over each rollout batch", AT_LEAST_ONE)
    micro_batch_size: int = setting(
        16,
        "most rows per process per forward/backward (a process's share of a minibatch goes in ceil(share / micro) "
        "near-equal chunks)",
        AT_LEAST_ONE)
    response_length: int = setting(48, "max new tokens per response", AT_LEAST_ONE)
    temperature: float = setting(0.7, "sampling temperature, also applied in every log-prob", POSITIVE)
    rollout_logprobs: str = setting(
        "auto",
        "sample: the sampler's log-probs (N+) | recompute: a fresh policy forward | auto: sample in float32, "
        "recompute in 16-bit dtypes",
        OneOf("auto", "sample", "recompute"))
    lr: float = setting(1e-4, "peak learning rate (policy; the value too unless value_lr)", POSITIVE)
    value_lr: float = setting(0.0, "peak learning rate of the value's adapters and head (0: lr)", NON_NEGATIVE)
    lr_schedule: str = setting("linear", "linear (to 0, N+) | constant", OneOf("linear", "constant"))
    adam_eps: float = setting(1e-5, "AdamW epsilon", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "gradient clipping", NON_NEGATIVE)
    kl_coef: float = setting(0.05, "initial beta of the per-token KL penalty", NON_NEGATIVE)
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
    cliprange: float = setting(0.2, "PPO policy ratio clip", POSITIVE)
    cliprange_value: float = setting(0.2, "value clip around the old values", POSITIVE)
    vf_coef: float = setting(0.1, "value loss weight", NON_NEGATIVE)
    normalize_reward: bool = setting(True, "(r - mean) / std with the reward stage's statistics")
    whiten_rewards: bool = setting(False, "whiten the token rewards per batch (off by default)")
    whiten_advantages: bool = setting(True, "whiten advantages over real tokens")
    missing_stop_penalty: float = setting(-1.0, "N+: a response with no stop token scores -1")
    missing_stop_mode: str = setting("replace", "replace | subtract | none", OneOf("replace", "subtract", "none"))
    log_every: int = setting(1, "iterations between logged metrics", AT_LEAST_ONE)
    save_every: int = setting(0, "iterations between checkpoints (0: at the end only)", NON_NEGATIVE)
    keep_checkpoints: int = setting(2, "most recent checkpoints kept", AT_LEAST_ONE)
    stop_after_iterations: int = setting(0, "testing aid: stop as if killed", NON_NEGATIVE)


@dataclass
class PPOEvalConfig:
    every: int = setting(0, "iterations; 0: at the end only", NON_NEGATIVE)
    num_prompts: int = setting(64, "held-out prompts per evaluation", NON_NEGATIVE)
    temperature: float = setting(0.7, "sampling temperature at evaluation", POSITIVE)
    gold: str = setting(
        "",
        "optional \"module:function(prompts, responses, ended) -> list[float]\"",
        Spec(args=3, call="fn(prompts, responses, ended)"))
    num_samples_logged: int = setting(8, "samples written to samples.jsonl / W&B per evaluation", NON_NEGATIVE)


@dataclass
class PPOConfig:
    output_dir: str = setting("runs/ppo", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    sft_run: str = setting("", "the SFT run dir: backbone, reference and initial policy")
    reward_run: str = setting("", "the reward stage's run dir (the learned reward role)")
    reward_fn: str = setting(
        "",
        "or a programmatic reward \"module:function(prompts, responses, ended) -> list[float]\" (then value.init=fresh)",
        Spec(args=3, call="fn(prompts, responses, ended)"))
    model: ModelConfig = field(default_factory=ModelConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    data: PPODataConfig = field(default_factory=PPODataConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def checks(self, at: str) -> Iterator[str]:
        """The run dirs this stage reads, the reward source, the backbone and the minibatch split."""
        yield from policy_stage_problems(self, at, "ppo")
        if self.ppo.kl_estimator in ("k2", "k3"):  # valid estimators (align.rl.kl), wrong place
            yield (f"{at}ppo.kl_estimator={self.ppo.kl_estimator!r}: as a per-token penalty in the reward only k1 "
                   f"regularises toward the reference (k2 and k3 as rewards have a policy gradient other than that "
                   f"of KL(pi || ref): Tang & Munos 2025); use k1 (docs/objectives.md)")
        if not self.reward_run and self.reward_fn and self.value.init == "reward":
            yield f"{at}value.init='reward' needs a learned reward (reward_run); use value.init=fresh with reward_fn"

    @property
    def train(self):
        """start_stage reads seed and grad_accum from here: one optimizer step per minibatch,
        accumulated over its micro-batches (world size from the launcher's environment)."""
        a = self.ppo
        try:
            accum = minibatch_split(a, int(os.environ.get("WORLD_SIZE", "1"))).accum_steps
        except ConfigError:  # run() refuses such a config before it gets here
            accum = 1
        return _TrainView(a.seed, accum)


def policy_stage_problems(cfg, at: str, section: str) -> Iterator[str]:
    """What every online policy-optimisation stage (PPO, GRPO, RLOO) checks before it writes
    anything: its output dir, the SFT run, exactly one reward source, the backbone, the split."""
    if not cfg.output_dir:
        yield f"{at}output_dir: required"
    yield from run_dir_problems(cfg.sft_run, f"{at}sft_run", "sft")
    if bool(cfg.reward_run) == bool(cfg.reward_fn):
        yield (f"{at}reward_run={cfg.reward_run!r}, {at}reward_fn={cfg.reward_fn!r}: give exactly one "
               f"(a learned reward's run dir, or a programmatic reward)")
    elif cfg.reward_run:
        yield from run_dir_problems(cfg.reward_run, f"{at}reward_run", "reward")
        yield from _same_backbone(cfg.sft_run, cfg.reward_run, at)
    yield from backbone_problems(cfg.model.path, cfg.sft_run, f"{at}model.path")
    a = getattr(cfg, section)
    if all(AT_LEAST_ONE.problem(getattr(a, k)) is None
           for k in ("rollout_batch_size", "num_minibatches", "micro_batch_size")):
        try:
            minibatch_split(a, int(os.environ.get("WORLD_SIZE", "1")), section)
        except ConfigError as e:
            yield str(e)


def _same_backbone(sft_run: str, reward_run: str, at: str) -> Iterator[str]:
    """The SFT and reward runs must have trained on the same backbone (their recorded fingerprints)."""
    prints = []
    for run in (sft_run, reward_run):
        f = Path(run) / "backbone.json"
        try:
            prints.append(json.loads(f.read_text()).get("fingerprint"))
        except (OSError, ValueError):
            return  # run_dir_problems names a missing or broken record
    if prints[0] and prints[1] and prints[0] != prints[1]:
        yield (f"{at}reward_run={reward_run!r} was trained on another backbone than {at}sft_run={sft_run!r} "
               f"(fingerprints {prints[1][:12]} vs {prints[0][:12]}); train the reward model from this SFT run")


@dataclass
class _TrainView:
    seed: int
    grad_accum: int = 1


@dataclass(frozen=True)
class MinibatchSplit:
    """How each global PPO minibatch is spread over processes and micro-batches.

    Every process gets ``per_rank`` rows of every minibatch, in ``accum_steps`` forward/backward
    calls of at most ``ppo.micro_batch_size`` rows: the minibatch (in its shuffled order) is cut into
    ``world * accum_steps`` consecutive chunks of near-equal size (``torch.tensor_split``: sizes
    differ by at most one), chunk ``m`` going to rank ``m % world`` as its accumulation step
    ``m // world``. So every rank makes the same number of forward/backward calls and collectives
    per optimizer step whatever the sizes, and a run on ``world`` processes cuts the minibatch
    exactly as one process does with ``micro_batch_size = chunk`` when the chunks are equal (in
    particular: as one process with the same ``micro_batch_size`` when it divides ``per_rank``)."""
    world: int
    minibatch: int      # global rows per minibatch: rollout_batch_size / num_minibatches
    per_rank: int       # rows of every minibatch per process: minibatch / world
    accum_steps: int    # forward/backward calls per process per optimizer step: ceil(per_rank / micro)
    chunk: int          # rows of the largest chunk (<= micro_batch_size)

    def chunks(self, minibatch_rows: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """This rank's chunks of one global minibatch (row indices), in accumulation order."""
        return list(torch.tensor_split(minibatch_rows, self.world * self.accum_steps))[rank::self.world]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def minibatch_split(a: PPOAlgoConfig, world: int, section: str = "ppo") -> MinibatchSplit:
    """The split of every minibatch over ``world`` processes; a ConfigError (naming the keys and
    values that would work) when ``rollout_batch_size`` does not divide evenly into
    ``world x num_minibatches`` shares."""
    for key in ("rollout_batch_size", "num_minibatches", "micro_batch_size"):
        if getattr(a, key) < 1:
            raise ConfigError(f"{section}.{key}={getattr(a, key)}: give a positive number")
    rollout, nm, micro = a.rollout_batch_size, a.num_minibatches, a.micro_batch_size
    parts = world * nm
    if rollout % parts:
        lo = rollout // parts * parts
        ways = [f"a {section}.rollout_batch_size that is a multiple of {parts} (e.g. "
                + " or ".join(str(v) for v in (lo, lo + parts) if v > 0) + ")"]
        if rollout % world == 0:
            ways.append(f"{section}.num_minibatches one of {_divisors(rollout // world)}")
        if rollout % nm == 0:
            ways.append(f"a number of processes in {_divisors(rollout // nm)}")
        raise ConfigError(
            f"{section}.rollout_batch_size={rollout} does not split into {world} process(es) x "
            f"{section}.num_minibatches={nm} equal shares (every process needs the same number of rows of "
            f"every minibatch); use " + ", or ".join(ways))
    per_rank = rollout // parts
    accum = -(-per_rank // micro)
    return MinibatchSplit(world=world, minibatch=rollout // nm, per_rank=per_rank, accum_steps=accum,
                          chunk=-(-per_rank // accum))


# ------------------------------------------------------------------------------------ roles
def build_roles(model, cfg: PPOConfig, with_value: bool = True) -> dict:
    """reference, policy, value (unless ``with_value=False``: GRPO, RLOO) and reward roles over the
    one backbone; returns their stacks."""
    sft_dir = Path(cfg.sft_run) / "adapters" / "sft"
    load_adapter(model, "sft", sft_dir)
    model.add_role("reference", ["sft"])
    model.copy_adapter("sft", "policy")
    model.add_role("policy", ["policy"])

    if cfg.reward_fn:
        if with_value and cfg.value.init == "reward":
            raise ConfigError("value.init=reward needs a learned reward (reward_run); use value.init=fresh")
        norm = {"mean": 0.0, "std": 1.0}
        reward_stack = None
    else:
        reward_stack, norm = load_reward_role(model, cfg.reward_run, sft_dir=sft_dir)
    if with_value:
        _build_value(model, cfg.value, reward_stack, norm if cfg.ppo.normalize_reward else None)
    else:
        model.set_trainable(["policy"])
    roles = ("reference", "policy") + (("value",) if with_value else ()) + \
        (("reward",) if reward_stack is not None else ())
    return {"reward_norm": norm, "stacks": {r: list(model.roles[r].adapters) for r in roles}}


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


# ------------------------------------------------------------------------------------ data
def load_prompts(cfg: PPOConfig, tok) -> tuple[list, list]:
    recs = require_records(read_records(require_file(cfg.data.prompts, "data.prompts"), cfg.data.chat),
                           cfg.data.prompts, "data.prompts")
    if cfg.data.eval_prompts:
        held = require_records(read_records(require_file(cfg.data.eval_prompts, "data.eval_prompts"), cfg.data.chat),
                               cfg.data.eval_prompts, "data.eval_prompts")
    else:
        recs, held = split_by_prompt(recs, cfg.data.eval_fraction)
    check_eval_split(len(held), file=cfg.data.eval_prompts, fraction=cfg.data.eval_fraction, train=cfg.data.prompts,
                     what="prompts", file_key="data.eval_prompts")   # none asked for: no eval logged

    def encode(rs, where):
        return encode_prompts(rs, where, tok, cfg.data.chat_template, cfg.data.max_prompt_length)
    return encode(recs, cfg.data.prompts), encode(held, cfg.data.eval_prompts or "held-out prompts")


load_gold = load_callable  # "module:function" -> the function (gold scorer or reward_fn)


# ------------------------------------------------------------------------------------ rollout
@dataclass
class Rollout:
    query: torch.Tensor          # [B, Q] left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor       # [B, R] PAD after the stop token
    response_mask: torch.Tensor  # [B, R] bool, real response tokens (stop token included)
    seq_lengths: torch.Tensor    # [B] index of the last real response token
    has_stop: torch.Tensor
    logprobs: torch.Tensor       # [B, R] old log-probs (policy at T)
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor         # normalised, penalised
    sample_logprobs: torch.Tensor


@torch.no_grad()
def rollout(model, engine, prompts, cfg: PPOConfig, tok, rt, norm, row_seeds, width, reward_fn=None,
            algo=None, step: int = 0) -> tuple[Rollout, float]:
    """Sample, score and evaluate one batch. ``width``: the prompt width of the *global* batch, so
    every process pads alike (gatherable, and numerically identical whatever the world size).
    ``algo``: the algorithm's settings (default ``cfg.ppo``; GRPO/RLOO pass theirs)."""
    a = algo or cfg.ppo
    resp = generate(model, [p["ids"] for p in prompts], tok, rt.device, role="policy",
                    max_new_tokens=a.response_length, temperature=a.temperature, width=width,
                    row_seeds=row_seeds, runtime=rt)
    recompute = recompute_logprobs(a.rollout_logprobs, cfg.model.dtype)
    with_value = "value" in model.roles
    roles = (("policy",) if recompute else ()) + ("reference",) + (("value",) if with_value else ()) + \
        (() if reward_fn else ("reward",))
    st = score(engine, resp, roles, a.temperature, a.micro_batch_size)
    n, problem, raw = len(prompts), None, torch.zeros(len(prompts), device=rt.device)
    try:
        if reward_fn:
            out = reward_fn([p["text"] for p in prompts], decode(tok, resp), resp.has_stop.tolist())
            raw = check_rewards(out, n, f"reward_fn {cfg.reward_fn}", step)
        else:
            raw = check_rewards(st["reward"]["score"], n, f"the reward role ({cfg.reward_run})", step)
    except NonFiniteError as e:
        problem = e
    agree(rt, problem, step)   # every process stops together
    raw = raw.to(rt.device)
    scores = (raw - norm["mean"]) / norm["std"] if a.normalize_reward else raw.clone()
    if a.missing_stop_mode != "none":
        scores = apply_missing_stop_penalty(scores, resp.has_stop, a.missing_stop_penalty, a.missing_stop_mode)
    # old log-probs: the sampler's own (the temperature-warped distribution it drew from, within
    # ~1e-6 of a fresh forward in float32: docs/ppo-notes.md §B6), or a fresh policy forward
    logprobs = st["policy"]["logprobs"] if recompute else resp.sample_logprobs.masked_fill(~resp.response_mask, 0.0)
    return Rollout(resp.query, resp.query_mask, resp.response, resp.response_mask, resp.seq_lengths, resp.has_stop,
                   logprobs, st["reference"]["logprobs"],
                   st["value"]["values"] if with_value else torch.zeros_like(logprobs), raw, scores,
                   resp.sample_logprobs), resp.generate_s


def recompute_logprobs(mode: str, dtype: str) -> bool:
    """Whether the rollout recomputes the policy's log-probs with a fresh forward. In float32 the
    sampler's cached-decoding log-probs equal a fresh forward's to ~1e-6, so reusing them saves one
    policy forward per rollout (N+ and TRL do the same); in bf16/fp16 the cached and uncached
    paths round differently, and a fresh forward keeps the first PPO ratio at exactly 1."""
    if mode == "auto":
        return dtype != "float32"
    if mode not in ("sample", "recompute"):
        raise ConfigError(f"ppo.rollout_logprobs={mode!r}: choose auto, sample or recompute")
    return mode == "recompute"


def gather_rollout(ro: Rollout, rt) -> Rollout:
    """All-gather every rollout tensor across processes (rows in rank order)."""
    out = {}
    for f in dataclasses.fields(ro):
        t = getattr(ro, f.name)
        out[f.name] = rt.accelerator.gather(t.contiguous())
    return Rollout(**out)


# ------------------------------------------------------------------------------------ the stage
def check(cfg: PPOConfig) -> tuple[str, MinibatchSplit]:
    """What can be refused before the run directory exists: the backbone and the minibatch split."""
    if not cfg.sft_run:
        raise ConfigError("sft_run is required (the reference policy is the SFT adapters)")
    if bool(cfg.reward_run) == bool(cfg.reward_fn):
        raise ConfigError("give exactly one of reward_run (learned reward) and reward_fn (programmatic)")
    a = cfg.ppo
    recompute_logprobs(a.rollout_logprobs, cfg.model.dtype)
    if a.value_lr < 0:
        raise ConfigError(f"ppo.value_lr={a.value_lr}: give a positive rate, or 0 for ppo.lr")
    backbone = cfg.model.path or backbone_from_run(cfg.sft_run)["path"]
    return backbone, minibatch_split(a, int(os.environ.get("WORLD_SIZE", "1")))


class PromptOrder:
    """Which prompts each iteration samples: a per-epoch permutation of the training prompts that
    depends only on the seed, cut into global rollout batches; a rank takes its contiguous share
    and every row its own sampling seed, so the rollouts are the same whatever the world size and
    a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, prompts: list, a: PPOAlgoConfig, rank: int, world: int):
        self.prompts, self.a, self.batch = prompts, a, a.rollout_batch_size
        if len(prompts) < self.batch:
            raise ConfigError(f"{len(prompts)} training prompts cannot fill ppo.rollout_batch_size={self.batch}")
        self.steps_per_epoch = len(prompts) // self.batch
        local = self.batch // world
        self.rows = range(rank * local, (rank + 1) * local)

    def __call__(self, it: int) -> tuple[list, list[int], int]:
        """This rank's prompts of iteration ``it``, their sampling seeds (by global row) and the
        prompt width of the global batch."""
        epoch, idx = divmod(it, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=g)[idx * self.batch:(idx + 1) * self.batch]
        width = max(len(self.prompts[i]["ids"]) for i in perm.tolist())
        seeds = [self.a.seed * 7_919_000 + it * self.batch + r for r in self.rows]
        return [self.prompts[perm[r]] for r in self.rows], seeds, width


def advantages(ro: Rollout, kl_coef: float, a: PPOAlgoConfig) -> dict[str, torch.Tensor]:
    """Per-token KL penalty and rewards, GAE advantages and returns of a (global) rollout batch."""
    kl = masked_kl(ro.logprobs, ro.ref_logprobs, ro.response_mask, a.kl_estimator)
    rewards, non_score = compute_token_rewards(ro.scores, kl, kl_coef, ro.response_mask, ro.seq_lengths)
    if a.whiten_rewards:
        rewards = whiten_rewards(rewards, ro.response_mask)
    adv, returns = compute_gae(rewards, ro.values, ro.response_mask, a.gamma, a.lam)
    if a.whiten_advantages:
        adv = masked_whiten(adv, ro.response_mask, shift_mean=True)
    return {"kl": kl, "non_score": non_score, "advantages": adv, "returns": returns}


class PPOLoop:
    """One PPO run's moving parts over the shared backbone: rollout, update, metrics, checkpoint."""

    section = "ppo"       # the config section of the algorithm's settings
    with_value = True     # PPO has a critic; GRPO and RLOO (align/stages/grpo.py) do not

    def __init__(self, cfg: PPOConfig, st, split: MinibatchSplit, backbone: str):
        self.cfg, self.a, self.st, self.backbone = cfg, getattr(cfg, self.section), st, backbone
        self.rt, self.tok, self.model = st.rt, st.tokenizer, st.model
        self.split = split
        if self.rt.world_size != split.world:
            self.split = minibatch_split(self.a, self.rt.world_size, self.section)
            if self.split.accum_steps != self.rt.accelerator.gradient_accumulation_steps:
                raise RuntimeError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {self.rt.world_size} processes")
        self.info = build_roles(self.model, cfg, with_value=self.with_value)
        self.norm = self.info["reward_norm"]
        t_norm = self.norm.get("temperature")
        if self.a.normalize_reward and t_norm is not None and float(t_norm) != float(self.a.temperature):
            self.rt.print(f"[{self.section}] warning: the reward's normalisation statistics were sampled at "
                          f"temperature {t_norm} (reward run's normalize.temperature), this stage samples at "
                          f"{self.section}.temperature={self.a.temperature}: normalised scores will not start at "
                          f"mean 0 / std 1; retrain the reward with normalize.temperature={self.a.temperature}")
        train_prompts, self.eval_prompts = load_prompts(cfg, self.tok)
        self.order = self.prompt_order(train_prompts)
        self.gold_fn, self.reward_fn = load_gold(cfg.eval.gold), load_gold(cfg.reward_fn)
        self.model.eval()  # dropout off in every role (docs/ppo-notes.md §B7); nothing here uses train mode

    def prompt_order(self, prompts: list) -> PromptOrder:
        return PromptOrder(prompts, self.a, self.rt.rank, self.rt.world_size)

    def epochs(self) -> int:
        return self.a.num_ppo_epochs

    def optimizer_groups(self, params: list):
        return parameter_groups(self.model, params, self.a.value_lr)

    def kl_controller(self):
        a = self.a
        return make_kl_controller(a.kl_controller, kl_coef=a.kl_coef, target=a.kl_target, horizon=a.kl_horizon)

    def prepare(self) -> int:
        """Optimizer (one group, or the value's own at ``ppo.value_lr``), schedule over every
        optimizer step, KL controller; wrapped and restored from a checkpoint when resuming."""
        from align.config import TrainConfig
        a = self.a
        self.params = self.model.trainable_parameters()
        optimizer = make_optimizer(self.optimizer_groups(self.params),
                                   TrainConfig(lr=a.lr, weight_decay=a.weight_decay, adam_eps=a.adam_eps))
        self.sched = make_scheduler(optimizer, a.lr_schedule, 0, a.iterations * self.epochs() * a.num_minibatches)
        self.kl_ctl = self.kl_controller()
        self.engine, self.optimizer, start, _ = prepare_resumable(
            self.rt, self.model, optimizer, self.sched, self.st.run_dir, self.cfg.resume, self.split.chunk, self.section,
            stateful={"kl_controller": self.kl_ctl}, max_grad_norm=self.a.max_grad_norm, dtype=self.cfg.model.dtype)
        self.params = self.model.trainable_parameters()  # FSDP2 replaced them by their shards
        return start

    def rollout(self, it: int) -> tuple[Rollout, float, float]:
        """The global rollout batch of iteration ``it`` (every rank holds all of it, so whitening and
        minibatches are global), with generation and rollout seconds."""
        t0 = time.time()
        prompts, seeds, width = self.order(it)
        ro, t_generate = rollout(self.model, self.engine, prompts, self.cfg, self.tok, self.rt, self.norm, seeds,
                                 width, self.reward_fn, algo=self.a, step=it + 1)
        if self.rt.world_size > 1:
            ro = gather_rollout(ro, self.rt)
        return ro, t_generate, time.time() - t0

    def update(self, ro: Rollout, adv: dict, it: int) -> dict[str, list]:
        """PPO epochs over minibatches. Each global minibatch is cut into world x accum_steps
        near-equal chunks, chunk m going to rank m % world as its accumulation step m // world
        (MinibatchSplit): every rank makes the same number of forward/backward calls, so no rank
        waits at a collective alone."""
        a, rt = self.a, self.rt
        stats: dict[str, list] = {}
        for epoch in range(self.epochs()):
            g = torch.Generator().manual_seed(a.seed * 7919 + it * 131 + epoch)
            perm = torch.randperm(a.rollout_batch_size, generator=g)
            for mb in range(a.num_minibatches):
                gmb = perm[mb * self.split.minibatch:(mb + 1) * self.split.minibatch]
                for k, idx in enumerate(self.split.chunks(gmb, rt.rank)):
                    step = self.train_chunk(ro, adv, idx.to(rt.device), gmb, it + 1)
                    for key, val in step.items():
                        stats.setdefault(key, []).append(val)
                    if epoch == 0 and mb == 0 and k == 0:
                        for key in ("approxkl", "ratio_mean", "clipfrac"):
                            stats[f"policy/first_{key}"] = [step[f"policy/{key}"]]
        return stats

    def train_chunk(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor,
                    it: int) -> dict[str, float]:
        """Forward/backward of one chunk under policy and value (one module call); the optimizer
        steps when accelerate's accumulation says so. ``minibatch``: the global minibatch's rows
        (``idx`` is this rank's chunk of it); ``it``: the iteration (1-based). Returns the chunk's
        loss statistics."""
        a, rt = self.a, self.rt
        with rt.accelerator.accumulate(self.engine):
            out = response_stats(self.engine, ro.query[idx], ro.query_mask[idx], ro.response[idx],
                                 ro.response_mask[idx], ("policy", "value"), a.temperature)
            m = ro.response_mask[idx]
            pg, pg_stats = policy_loss(out["policy"]["logprobs"], ro.logprobs[idx], adv["advantages"][idx], m,
                                       a.cliprange)
            vf, vf_stats = value_loss(out["value"]["values"], ro.values[idx], adv["returns"][idx], m,
                                      a.cliprange_value)
            loss = pg + a.vf_coef * vf
            check_loss(loss, it, self.section, rt)
            rt.accelerator.backward(loss)  # accelerate divides by the accumulation steps
            if rt.accelerator.sync_gradients:
                if a.max_grad_norm > 0:
                    rt.accelerator.clip_grad_norm_(self.params, a.max_grad_norm)
                self.optimizer.step()
                self.sched.step()
                self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            ent = masked_mean(entropy_from_logits(out["policy"]["logits"], a.temperature), m)
        vals = {"policy/loss": pg, "value/loss": vf, "policy/entropy": ent,
                **{f"policy/{k}": v for k, v in pg_stats.items()}, **{f"value/{k}": v for k, v in vf_stats.items()}}
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in vals.items()}

    def metrics(self, ro: Rollout, adv: dict, stats: dict, mean_kl: float, times: dict) -> dict:
        """The iteration's logged metrics (averaged over processes)."""
        ro_tokens = float(ro.response_mask.sum())
        lrs = self.sched.get_last_lr()
        logs = {
            "objective/kl": mean_kl, "objective/kl_coef": self.kl_ctl.value,
            "objective/scores": float(ro.scores.mean()), "objective/raw_scores": float(ro.raw_scores.mean()),
            "objective/rlhf_reward": float((ro.scores + adv["non_score"].sum(1)).mean()),
            "objective/non_score_reward": float(adv["non_score"].sum(1).mean()),
            "policy/entropy_rollout": float(masked_mean(-ro.logprobs, ro.response_mask)),
            "value/explained_variance": float(explained_variance(ro.values, adv["returns"], ro.response_mask)),
            "response/length": float(ro.response_mask.sum(1).float().mean()),
            "response/stop_rate": float(ro.has_stop.float().mean()),
            "lr": lrs[0], **({"lr_value": lrs[1]} if len(lrs) > 1 else {}),
            "throughput/generated_tokens_per_s": ro_tokens / max(times["generate"], 1e-9),
            "throughput/rollout_tokens_per_s": ro_tokens / max(times["rollout"], 1e-9),
            "throughput/train_tokens_per_s": ro_tokens * self.epochs() / max(times["update"], 1e-9),
            "time/rollout_s": times["rollout"], "time/generate_s": times["generate"], "time/update_s": times["update"],
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        return self.rt.mean_across(logs)

    def evaluate(self, it: int) -> dict:
        return evaluate_policy(self.model, self.engine, self.eval_prompts, self.cfg, self.tok, self.rt, self.gold_fn,
                               it, self.st.tracker, self.reward_fn, algo=self.a, section=self.section)

    def iteration(self, it: int) -> dict:
        """Rollout, advantages, update and the KL controller's step of iteration ``it``; its logs."""
        ro, t_generate, t_rollout = self.rollout(it)
        adv = self.advantages(ro)
        t1 = time.time()
        stats = self.update(ro, adv, it)
        t_update = time.time() - t1
        mean_kl = self.rt.mean_across({"kl": float(adv["kl"].sum(1).mean())})["kl"]
        self.kl_ctl.update(mean_kl, self.a.rollout_batch_size)
        return self.metrics(ro, adv, stats, mean_kl,
                            {"generate": t_generate, "rollout": t_rollout, "update": t_update})

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        return advantages(ro, self.kl_ctl.value, self.a)

    def save_checkpoint(self, it: int) -> None:
        save_resumable(self.rt, self.st.run_dir, it, self.model, self.optimizer, self.sched, self.a.keep_checkpoints,
                       stateful={"kl_controller": self.kl_ctl})

    def save_final(self) -> None:
        model, rt = self.model, self.rt
        trained = ["policy", "value"] if "value" in model.adapters else ["policy"]
        heads = ["value"] if "value" in model.heads else []
        with rt.gathered([p for n in trained for p in model.adapters[n].parameters()] +
                         [p for h in heads for p in model.heads[h].parameters()]):
            if rt.is_main:
                for n in trained:
                    save_adapter(model, n, self.st.run_dir / "adapters" / n, backbone_name=self.backbone)
                for h in heads:
                    save_head(model, h, self.st.run_dir / "heads" / h)
                (self.st.run_dir / "roles.json").write_text(json.dumps(self.info["stacks"], indent=2))


@stage_entry
def run(cfg: PPOConfig) -> dict:
    validate(cfg)  # every key, file and run dir, before the run directory is written
    backbone, split = check(cfg)  # refused before the run dir exists
    return run_loop(PPOLoop, cfg, backbone, split)


def run_loop(loop_cls, cfg, backbone: str, split: MinibatchSplit) -> dict:
    """The iteration loop every online policy-optimisation stage shares (PPO, GRPO, RLOO): log,
    evaluate, checkpoint, stop; the stage's loop class does the rollouts and updates."""
    name = loop_cls.section
    st = start_stage(cfg, name, backbone)
    loop = loop_cls(cfg, st, split, backbone)
    start = loop.prepare()
    a, rt = loop.a, st.rt
    bar = tqdm(total=a.iterations, initial=start, desc=name, disable=not rt.is_main, dynamic_ncols=True)
    last_eval: dict = {}
    if start == 0 and cfg.eval.every:  # the SFT policy's score: the baseline of every curve
        st.tracker.log(loop.evaluate(0), 0)
    mark_started(st.run_dir)
    it = start
    while it < a.iterations:
        logs = loop.iteration(it)
        it += 1
        bar.update(1)
        if it % max(1, a.log_every) == 0 or it == a.iterations:
            st.tracker.log(logs, it)
            bar.set_postfix(score=f"{logs['objective/scores']:.3f}", kl=f"{logs['objective/kl']:.3f}")
        if (cfg.eval.every and it % cfg.eval.every == 0) or it == a.iterations:
            last_eval = loop.evaluate(it)
            st.tracker.log(last_eval, it)
        if (a.save_every and it % a.save_every == 0) or it == a.iterations:
            loop.save_checkpoint(it)
        if a.stop_after_iterations and it >= a.stop_after_iterations and it < a.iterations:
            rt.print(f"[{name}] stopping after {it} iterations ({name}.stop_after_iterations)")
            bar.close()
            st.tracker.finish()
            return {"stopped_at": it}
    bar.close()
    loop.save_final()
    summary = {"stage": name, "iterations": it, **last_eval, "kl_coef_final": loop.kl_ctl.value,
               "trainable_params": {r: loop.model.role_num_params(r) for r in ("policy", "value")
                                    if r in loop.model.roles},
               "backbone_params": loop.model.backbone_num_params()}
    return finish_stage(st, summary, "policy")


def evaluate_policy(model, engine, eval_prompts, cfg: PPOConfig, tok, rt, gold_fn, it, tracker,
                    reward_fn=None, algo=None, section: str = "ppo") -> dict:
    """The policy on held-out prompts: mean reward, KL to the reference and the gold score when
    ``eval.gold`` names one; samples go to samples.jsonl / W&B."""
    a = algo or cfg.ppo
    prompts = eval_prompts[:cfg.eval.num_prompts]
    if not prompts:
        return {}
    gen = torch.Generator(device=rt.device).manual_seed(a.seed + 99991)
    res = evaluate_role(model, engine, prompts, tok, rt.device, role="policy", temperature=cfg.eval.temperature,
                        max_new_tokens=a.response_length, generator=gen, reward_fn=reward_fn,
                        runtime=rt)
    out = {"eval/reward": float(res["reward"].mean()), "eval/kl": float(res["kl"].mean()),
           "eval/num_prompts": len(prompts)}
    rows = [{"prompt": p["text"], "response": r, "reward": float(s)}
            for p, r, s in zip(prompts, res["responses"], res["reward"])]
    if gold_fn is not None:
        gold = torch.tensor(gold_fn([p["text"] for p in prompts], res["responses"], res["ended"]), dtype=torch.float)
        out["eval/gold"] = float(gold.mean())
        out["eval/gold_sem"] = float(gold.std() / math.sqrt(len(gold))) if len(gold) > 1 else 0.0
        for row, gsc in zip(rows, gold.tolist()):
            row["gold"] = gsc
    tracker.log_samples(f"{section}/samples", rows[:cfg.eval.num_samples_logged], it)
    return out
