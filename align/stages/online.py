"""The online policy-optimisation loop that PPO, GRPO and RLOO share.

Every online stage samples responses from the policy (a trainable copy of the SFT adapters),
scores them with the learned reward role or a programmatic ``reward_fn`` and the reference (the
SFT adapters), and updates the policy on minibatches of the rollout; they differ only in their
advantages, their loss and whether a critic (PPO's value role) is trained beside the policy.

This module holds what they share, written once: the config sections and their rules
(:class:`OnlineStageConfig`, :class:`OnlineAlgoConfig`), the prompt order, the rollout (sample,
score, check rewards), the minibatch split over processes, the optimizer step, evaluation,
checkpoints and exact resume (:class:`OnlineLoop`, :func:`run_online`). A stage subclasses
:class:`OnlineLoop` and supplies its hooks: ``build_roles``, ``advantages``, ``train_chunk`` (its
loss), ``extra_metrics``, and the KL controller when it is not a fixed coefficient.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Optional

import torch
from tqdm.auto import tqdm

from align.adapters.peft_format import load_adapter, save_adapter, save_head
from align.config import (ConfigError, ModelConfig, TrackingConfig, backbone_problems, require_file,
                          run_dir_problems, validate)
from align.data.common import check_eval_split, read_records, require_records, split_by_prompt
from align.data.sft import encode_prompts
from align.guard import NonFiniteError, agree, check_loss, mark_started
from align.resume import prepare_resumable, save_resumable
from align.rl.group import overlong_penalty
from align.rl.functional import masked_mean
from align.rl.kl import make_kl_controller
from align.rl.rollout import apply_missing_stop_penalty
from align.rewardmix import REWARD_FN_SPEC, RewardMix, column_problems, entry_problems, sources_from_config
from align.rundir import RunDir
from align.hub import RecordsPath
from align.rules import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, OneOf, Range, setting
from align.scoring import (call_scorer, decode, evaluate_role, generate, load_callable, load_reward_role,
                           response_stats, reward_set_name, score)
from align.stages.common import backbone_from_run, finish_stage, start_stage
from align.trainer import make_optimizer, make_scheduler



# ------------------------------------------------------------------------------------ configs
@dataclass
class OnlineDataConfig:
    prompts: str = setting(
        "",
        "records with a \"prompt\" (text, or a conversation ending with a user turn) or \"messages\" (such a "
        "conversation), their other fields passed to reward functions; or a Hub dataset id org/name[:split] in the "
        "local HF cache",
        RecordsPath(required=True, what="a records file with prompts"))
    eval_prompts: str = setting("", "held-out prompts; else eval_fraction of prompts", RecordsPath())
    eval_fraction: float = setting(0.05, "held-out share of prompts when eval_prompts is empty", FRACTION)
    max_prompt_length: int = setting(256, "longer prompts lose their oldest turns whole (system and last user "
                                          "turn kept), then keep their last tokens", AT_LEAST_ONE)
    chat_template: Optional[str] = setting(None, "Jinja template for tokenizers without one")
    chat: bool = setting(False, "plain-text prompts/completions as a user and an assistant turn (chat template)")


@dataclass
class OnlineEvalConfig:
    every: int = setting(0, "iterations; 0: at the end only", NON_NEGATIVE)
    num_prompts: int = setting(64, "held-out prompts per evaluation", NON_NEGATIVE)
    temperature: float = setting(0.7, "sampling temperature at evaluation", POSITIVE)
    gold: str = setting(
        "",
        "optional \"module:function(prompts, responses, ended, **columns) -> list[float]\" (columns as reward_fn)",
        REWARD_FN_SPEC)
    num_samples_logged: int = setting(8, "samples written to samples.jsonl / W&B per evaluation", NON_NEGATIVE)


@dataclass
class OnlineAlgoConfig:
    """The settings every online algorithm reads (its config section: ``ppo``, ``grpo``, ``rloo``)."""
    seed: int = setting(0, "data order; sampling is seeded per response row")
    iterations: int = setting(100, "iterations (rollout + update)", AT_LEAST_ONE)
    rollout_batch_size: int = setting(64, "responses per iteration, over all processes", AT_LEAST_ONE)
    num_minibatches: int = setting(1, "optimizer steps per epoch over the rollout", AT_LEAST_ONE)
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
    lr: float = setting(1e-4, "peak learning rate of the policy", POSITIVE)
    lr_schedule: str = setting("linear", "linear (to 0, N+) | constant", OneOf("linear", "constant"))
    warmup_iterations: int = setting(
        0,
        "iterations over which the learning rate rises linearly to lr (per optimizer step) before lr_schedule; "
        "Adam's first step moves every adapter weight by lr whatever the gradient's size, which on SmolLM2 at lr "
        "5e-4 moved the policy by an approximate KL of 1.4 within the first iteration (docs/grpo-rloo.md)",
        NON_NEGATIVE)
    adam_eps: float = setting(1e-5, "AdamW epsilon", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay", NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: off)", NON_NEGATIVE)
    kl_coef: float = setting(0.05, "beta of the KL to the reference (SFT) policy", NON_NEGATIVE)
    cliprange: float = setting(0.2, "policy ratio clip", POSITIVE)
    normalize_reward: bool = setting(True, "(r - mean) / std with the reward stage's statistics")
    missing_stop_penalty: float = setting(-1.0, "N+: a response with no stop token scores -1 (mode replace)")
    missing_stop_mode: str = setting("replace", "replace | subtract | none", OneOf("replace", "subtract", "none"))
    log_every: int = setting(1, "iterations between logged metrics", AT_LEAST_ONE)
    save_every: int = setting(0, "iterations between checkpoints (0: at the end only)", NON_NEGATIVE)
    keep_checkpoints: int = setting(2, "most recent checkpoints kept", AT_LEAST_ONE)
    stop_after_iterations: int = setting(0, "testing aid: stop as if killed", NON_NEGATIVE)
    share_prompt: bool = setting(
        True,
        "GRPO/RLOO: a group's samples run their prompt once per pass (sampling, scoring, update) and continue from "
        "its keys/values (the same results up to float rounding), and minibatches hold whole groups. false: every "
        "row runs its prompt and minibatches are drawn row by row (PPO samples once per prompt: no effect)")
    entropy_warn_fraction: float = setting(
        0.2, "warn once when the rollouts' mean token entropy (policy/entropy_rollout) falls below this fraction of "
             "its first value in the run (entropy collapse); 0: never", FRACTION)

    @property
    def group(self) -> int:
        """Responses sampled per prompt (consecutive rows of the rollout)."""
        return 1

    @property
    def shares_prompt(self) -> bool:
        """Whether passes run a group's prompt once (``share_prompt`` with groups of several)."""
        return self.share_prompt and self.group > 1

    @property
    def epochs(self) -> int:
        """Passes over each rollout batch."""
        raise NotImplementedError


@dataclass
class TrainView:
    """What start_stage reads of an online stage's config (``cfg.train``)."""
    seed: int
    grad_accum: int = 1


@dataclass
class OnlineStageConfig:
    """The sections every online stage has; a stage adds its algorithm's section (``SECTION``)."""
    output_dir: str = setting("", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    sft_run: str = setting("", "the SFT run dir: backbone, reference and initial policy")
    reward_run: str = setting("", "the reward stage's run dir (the learned reward role)")
    reward_fn: str = setting(
        "",
        "or a programmatic reward \"module:function(prompts, responses, ended, **columns) -> list[float]\": the "
        "prompt records' other fields (a reference answer, ...) arrive as keyword arguments it names",
        REWARD_FN_SPEC)
    rewards: list = setting(
        help="several reward sources with weights instead of one: a list of {fn: module:function} (as reward_fn) "
             "and {role: reward} (the learned reward of reward_run), each with an optional weight (1) and name; "
             "the score is the weighted sum over the sources with an opinion (a function may return None)",
        factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: OnlineDataConfig = field(default_factory=OnlineDataConfig)
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    SECTION: ClassVar[str] = ""

    @property
    def algo(self) -> OnlineAlgoConfig:
        return getattr(self, self.SECTION)

    def checks(self, at: str) -> Iterator[str]:
        """The run dirs this stage reads, the reward source, the backbone, the groups and the split."""
        if not self.output_dir:
            yield f"{at}output_dir: required"
        yield from run_dir_problems(self.sft_run, f"{at}sft_run", "sft")
        if self.rewards:
            yield from entry_problems(self.rewards, self.reward_run, self.reward_fn, at)
        elif bool(self.reward_run) == bool(self.reward_fn):
            yield (f"{at}reward_run={self.reward_run!r}, {at}reward_fn={self.reward_fn!r}: give exactly one "
                   f"(a learned reward's run dir, or a programmatic reward), or list several in {at}rewards")
        if self.reward_run:
            yield from run_dir_problems(self.reward_run, f"{at}reward_run", "reward")
            yield from same_backbone(self.sft_run, self.reward_run, at)
        yield from backbone_problems(self.model.path, self.sft_run, f"{at}model.path")
        a, s = self.algo, self.SECTION
        if a.group >= 2 and a.rollout_batch_size >= 1 and a.rollout_batch_size % a.group:
            yield (f"{at}{s}.rollout_batch_size={a.rollout_batch_size} is not a multiple of {s}.group_size="
                   f"{a.group} (every prompt gets group_size responses)")
        if isinstance(a.warmup_iterations, int) and isinstance(a.iterations, int) \
                and a.warmup_iterations >= a.iterations >= 1:
            yield (f"{at}{s}.warmup_iterations={a.warmup_iterations}: not below {s}.iterations={a.iterations} "
                   f"(the learning rate would never reach {s}.lr)")
        if all(AT_LEAST_ONE.problem(getattr(a, k)) is None
               for k in ("rollout_batch_size", "num_minibatches", "micro_batch_size")):
            try:
                minibatch_split(a, world_size(), s)
            except ConfigError as e:
                yield str(e)

    @property
    def train(self) -> TrainView:
        """start_stage reads seed and grad_accum from here: one optimizer step per minibatch,
        accumulated over its micro-batches (world size from the launcher's environment)."""
        try:
            accum = minibatch_split(self.algo, world_size(), self.SECTION).accum_steps
        except ConfigError:  # run_online refuses such a config before it gets here
            accum = 1
        return TrainView(self.algo.seed, accum)


def world_size() -> int:
    """The number of processes the launcher started (before the runtime exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def same_backbone(sft_run: str, reward_run: str, at: str) -> Iterator[str]:
    """The SFT and reward runs must have trained on the same backbone (their recorded fingerprints)."""
    prints = []
    for run in (sft_run, reward_run):
        try:
            prints.append(json.loads(RunDir(run).backbone_record.read_text()).get("fingerprint"))
        except (OSError, ValueError):
            return  # run_dir_problems names a missing or broken record
    if prints[0] and prints[1] and prints[0] != prints[1]:
        yield (f"{at}reward_run={reward_run!r} was trained on another backbone than {at}sft_run={sft_run!r} "
               f"(fingerprints {prints[1][:12]} vs {prints[0][:12]}); train the reward model from this SFT run")


@dataclass(frozen=True)
class MinibatchSplit:
    """How each global minibatch is spread over processes and micro-batches.

    Every process gets ``per_rank`` rows of every minibatch, in ``accum_steps`` forward/backward
    calls of at most ``micro_batch_size`` rows: the minibatch (in its shuffled order) is cut into
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


def minibatch_split(a: OnlineAlgoConfig, world: int, section: str = "ppo") -> MinibatchSplit:
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


def recompute_logprobs(mode: str, dtype: str, section: str = "ppo") -> bool:
    """Whether the rollout recomputes the policy's log-probs with a fresh forward. In float32 the
    sampler's cached-decoding log-probs equal a fresh forward's to ~1e-6, so reusing them saves one
    policy forward per rollout (N+ and TRL do the same); in bf16/fp16 the cached and uncached
    paths round differently, and a fresh forward keeps the first ratio at exactly 1."""
    if mode == "auto":
        return dtype != "float32"
    if mode not in ("sample", "recompute"):
        raise ConfigError(f"{section}.rollout_logprobs={mode!r}: choose auto, sample or recompute")
    return mode == "recompute"


# ------------------------------------------------------------------------------------ roles
def build_policy_roles(model, cfg: OnlineStageConfig) -> tuple[list | None, dict]:
    """The roles every online stage has over the one backbone: ``reference`` (the SFT adapters,
    frozen), ``policy`` (a trainable copy of them) and, with a learned reward, ``reward`` (the
    reward run's adapters and head, frozen). Returns the reward role's adapter stack (None for a
    programmatic reward) and the reward's normalisation statistics."""
    sft_dir = RunDir(cfg.sft_run).adapter("sft")
    load_adapter(model, "sft", sft_dir)
    model.add_role("reference", ["sft"])
    model.copy_adapter("sft", "policy")
    model.add_role("policy", ["policy"])
    if not cfg.reward_run:
        return None, {"mean": 0.0, "std": 1.0}
    return load_reward_role(model, cfg.reward_run, sft_dir=sft_dir)


def roles_record(model, run: RunDir, sft_run: str, reward_run: str, trained: tuple[str, ...]) -> dict:
    """roles.json of an online run: each role's adapter stack as directories (the sets this run
    trained under its own ``adapters/``, the SFT set in the SFT run, the reward's sets as the reward
    run records them) and its head."""
    reward = RunDir(reward_run).role("reward") if reward_run else None
    reward_dirs = {} if reward is None else {
        reward_set_name(e["name"]): str(RunDir(reward_run).resolve(e["dir"])) for e in reward["adapters"]}

    def where(name: str) -> str:
        if name in trained:
            return str(run.adapter(name).relative_to(run.path))
        if name == "sft":
            return str(RunDir(sft_run).adapter("sft").resolve())
        return reward_dirs[name]
    out = {}
    for r in ("reference", "policy", "value", "reward"):
        if r in model.roles:
            out[r] = {"adapters": [{"name": n, "dir": where(n)} for n in model.roles[r].adapters]}
            head = model.roles[r].head
            if head is not None:
                out[r]["head"] = (str(run.head(head).relative_to(run.path)) if head in trained
                                  else str(RunDir(reward_run).resolve(reward["head"])))
    if reward is not None and "normalisation" in reward and "reward" in out:
        out["reward"]["normalisation"] = reward["normalisation"]
    return out


# ------------------------------------------------------------------------------------ data
def load_prompts(cfg: OnlineStageConfig, tok) -> tuple[list, list]:
    """The training and held-out prompts, encoded (the held-out ones from ``data.eval_prompts`` or
    an ``eval_fraction`` split by prompt)."""
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


class PromptOrder:
    """Which prompts each iteration samples: a per-epoch permutation of the training prompts that
    depends only on the seed, cut into global rollout batches of ``rollout_batch_size / group``
    prompts, each repeated ``group`` times in consecutive rows (its group; PPO: 1). A rank takes
    its contiguous share of the rows and every row its own sampling seed, so the rollouts are the
    same whatever the world size and a resumed run sees exactly the batches an uninterrupted one
    would."""

    def __init__(self, prompts: list, a: OnlineAlgoConfig, rank: int, world: int, section: str = "ppo"):
        self.prompts, self.a, self.batch, self.group = prompts, a, a.rollout_batch_size, a.group
        self.n_prompts = self.batch // self.group
        if len(prompts) < self.n_prompts:
            what = (f"{section}.rollout_batch_size={self.batch}" if self.group == 1 else
                    f"one batch of {self.n_prompts} prompts (rollout_batch_size / group_size)")
            raise ConfigError(f"{len(prompts)} training prompts cannot fill {what}")
        self.steps_per_epoch = len(prompts) // self.n_prompts
        local = self.batch // world
        self.rows = range(rank * local, (rank + 1) * local)

    def __call__(self, it: int) -> tuple[list, list[int], int]:
        """This rank's prompts of iteration ``it``, their sampling seeds (by global row) and the
        prompt width of the global batch."""
        epoch, idx = divmod(it, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=g)[idx * self.n_prompts:(idx + 1) * self.n_prompts]
        width = max(len(self.prompts[i]["ids"]) for i in perm.tolist())
        seeds = [self.a.seed * 7_919_000 + it * self.batch + r for r in self.rows]
        return [self.prompts[perm[r // self.group]] for r in self.rows], seeds, width

    def extra(self, it: int, round_: int) -> tuple[list, list[int], int]:
        """A further batch of prompts for iteration ``it`` (dynamic sampling's refill ``round_`` >= 1):
        drawn from all training prompts with a seed of its own, so a resumed run draws the same."""
        g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + 7_777_777 + it * 1_009 + round_)
        perm = torch.randperm(len(self.prompts), generator=g)[:self.n_prompts]
        width = max(len(self.prompts[i]["ids"]) for i in perm.tolist())
        seeds = [self.a.seed * 7_919_000 + 2**40 + (it * 1_009 + round_) * self.batch + r for r in self.rows]
        return [self.prompts[perm[r // self.group]] for r in self.rows], seeds, width


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
    values: torch.Tensor         # [B, R] the critic's values (zeros without one)
    raw_scores: torch.Tensor
    scores: torch.Tensor         # normalised, penalised
    sample_logprobs: torch.Tensor
    reward_parts: torch.Tensor   # [B, sources] each reward source's raw value (NaN: no opinion)


@torch.no_grad()
def rollout(model, engine, prompts, cfg: OnlineStageConfig, tok, rt, mix: RewardMix, row_seeds, width,
            step: int = 0, with_reference: bool = True) -> tuple[Rollout, float]:
    """Sample, score and evaluate one batch; returns it and the sampling seconds. ``width``: the
    prompt width of the *global* batch, so every process pads alike (gatherable, and numerically
    identical whatever the world size). ``with_reference=False`` (a KL coefficient of 0): no
    reference forward; the reference log-probs are the old ones (a KL of 0, which nothing reads)."""
    a = cfg.algo
    recompute = recompute_logprobs(a.rollout_logprobs, cfg.model.dtype, cfg.SECTION)
    with_value = "value" in model.roles
    # a value head on the policy's adapters is read by the sampler, as its log-probs are (float32,
    # unsharded weights): the values of the states each token was drawn from
    sampled_values = with_value and not recompute and model.sharded() is None and \
        model.roles["value"].adapters == model.roles["policy"].adapters
    resp = generate(model, [p["ids"] for p in prompts], tok, rt.device, role="policy",
                    max_new_tokens=a.response_length, temperature=a.temperature, width=width,
                    row_seeds=row_seeds, runtime=rt, shared_prompt=a.shares_prompt,
                    head=model.roles["value"].head if sampled_values else None)
    roles = (("policy",) if recompute else ()) + (("reference",) if with_reference else ()) + \
        (("value",) if with_value and not sampled_values else ()) + (("reward",) if mix.uses_role else ())
    st = score(engine, resp, roles, a.temperature, a.micro_batch_size, shared_prompt=a.shares_prompt)
    parts = _checked_parts(mix, rt, st, prompts, tok, resp, step)
    raw, scores = mix.combine(parts, normalised=False), mix.combine(parts)
    if a.missing_stop_mode != "none":
        scores = apply_missing_stop_penalty(scores, resp.has_stop, a.missing_stop_penalty, a.missing_stop_mode)
    # old log-probs: the sampler's own (the temperature-warped distribution it drew from, within
    # ~1e-6 of a fresh forward in float32: docs/ppo-notes.md §B6), or a fresh policy forward
    logprobs = st["policy"]["logprobs"] if recompute else resp.sample_logprobs.masked_fill(~resp.response_mask, 0.0)
    values = resp.sample_values.masked_fill(~resp.response_mask, 0.0) if sampled_values else \
        st["value"]["values"] if with_value else torch.zeros_like(logprobs)
    return Rollout(resp.query, resp.query_mask, resp.response, resp.response_mask, resp.seq_lengths, resp.has_stop,
                   logprobs, st["reference"]["logprobs"] if with_reference else logprobs.clone(), values, raw, scores,
                   resp.sample_logprobs, parts), resp.generate_s


def _checked_parts(mix: RewardMix, rt, st, prompts, tok, resp, step: int) -> torch.Tensor:
    """Every reward source's values for the batch (RewardMix.parts), or every process stops
    together naming the source and the step."""
    problem, parts = None, torch.zeros(len(prompts), len(mix.sources), device=rt.device)
    try:
        parts = mix.parts(prompts, decode(tok, resp), resp.has_stop.tolist(),
                          st["reward"]["score"] if mix.uses_role else None, step, rt.device)
    except NonFiniteError as e:
        problem = e
    agree(rt, problem, step)   # every process stops together
    return parts


def gather_rollout(ro: Rollout, rt) -> Rollout:
    """All-gather every rollout tensor across processes (rows in rank order)."""
    return Rollout(**{f.name: rt.accelerator.gather(getattr(ro, f.name).contiguous())
                      for f in dataclasses.fields(ro)})


# ------------------------------------------------------------------------------------ the loop
class OnlineLoop:
    """One online run's moving parts over the shared backbone: rollout, update, metrics,
    checkpoint. A stage subclasses it with its ``section`` and hooks."""

    section: ClassVar[str] = ""
    trained: ClassVar[tuple[str, ...]] = ("policy",)   # the adapter sets (and heads) a run saves

    def __init__(self, cfg: OnlineStageConfig, st, split: MinibatchSplit, backbone: str):
        self.cfg, self.a, self.st, self.backbone = cfg, cfg.algo, st, backbone
        self.rt, self.tok, self.model = st.rt, st.tokenizer, st.model
        self.split = split
        if self.rt.world_size != split.world:
            self.split = minibatch_split(self.a, self.rt.world_size, self.section)
            if self.split.accum_steps != self.rt.accelerator.gradient_accumulation_steps:
                raise RuntimeError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {self.rt.world_size} processes")
        self.norm = self.build_roles()
        self._warn_normalisation_temperature()
        train_prompts, self.eval_prompts = load_prompts(cfg, self.tok)
        self.order = PromptOrder(train_prompts, self.a, self.rt.rank, self.rt.world_size, self.section)
        self.gold_fn = load_callable(cfg.eval.gold)
        self.mix = RewardMix(sources_from_config(cfg), self.norm, self.a.normalize_reward)
        self.model.eval()  # dropout off in every role (docs/ppo-notes.md §B7); nothing here uses train mode

    # ---- hooks a stage supplies
    def build_roles(self) -> dict:
        """Reference, policy and reward roles (a stage with a critic adds it); returns the reward's
        normalisation statistics."""
        _, norm = build_policy_roles(self.model, self.cfg)
        self.model.set_trainable(["policy"])
        return norm

    def advantages(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """``kl`` (per token, logged) and ``advantages`` of a global rollout batch, plus whatever the
        stage's loss reads."""
        raise NotImplementedError

    def chunk_loss(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor, it: int):
        """The loss of this rank's chunk ``idx`` of the global ``minibatch`` at iteration ``it``
        (1-based) and its statistics, plus the policy's per-token entropy [rows, R] (no gradient)
        or None."""
        raise NotImplementedError

    def extra_metrics(self, ro: Rollout, adv: dict, times: dict) -> dict:
        return {}

    def optimizer_groups(self, params: list):
        return params

    def kl_controller(self):
        return make_kl_controller("fixed", kl_coef=self.a.kl_coef)

    # ---- the shared machinery
    def _warn_normalisation_temperature(self) -> None:
        t_norm = self.norm.get("temperature")
        if self.a.normalize_reward and t_norm is not None and float(t_norm) != float(self.a.temperature):
            self.rt.print(f"[{self.section}] warning: the reward's normalisation statistics were sampled at "
                          f"temperature {t_norm} (reward run's normalize.temperature), this stage samples at "
                          f"{self.section}.temperature={self.a.temperature}: normalised scores will not start at "
                          f"mean 0 / std 1; retrain the reward with normalize.temperature={self.a.temperature}")

    def prepare(self) -> int:
        """Optimizer, schedule over every optimizer step, KL controller; wrapped and restored from a
        checkpoint when resuming. Returns the iteration to start at."""
        from align.config import TrainConfig
        a = self.a
        self.params = self.model.trainable_parameters()
        optimizer = make_optimizer(self.optimizer_groups(self.params),
                                   TrainConfig(lr=a.lr, weight_decay=a.weight_decay, adam_eps=a.adam_eps))
        per_iteration = a.epochs * a.num_minibatches
        self.sched = make_scheduler(optimizer, a.lr_schedule, a.warmup_iterations * per_iteration,
                                    a.iterations * per_iteration)
        self.kl_ctl = self.kl_controller()
        self.engine, self.optimizer, start, _ = prepare_resumable(
            self.rt, self.model, optimizer, self.sched, self.st.run_dir, self.cfg.resume, self.split.chunk,
            self.section, stateful={"kl_controller": self.kl_ctl}, max_grad_norm=self.a.max_grad_norm,
            dtype=self.cfg.model.dtype)
        self.params = self.model.trainable_parameters()  # FSDP2 replaced them by their shards
        return start

    def rollout(self, it: int) -> tuple[Rollout, float, float]:
        """The global rollout batch of iteration ``it`` (every rank holds all of it, so whitening,
        groups and minibatches are global), with generation and rollout seconds."""
        t0 = time.time()
        ro, t_generate = self.sample_batch(*self.order(it), it)
        return ro, t_generate, time.time() - t0

    def sample_batch(self, prompts: list, seeds: list[int], width: int, it: int) -> tuple[Rollout, float]:
        """One global rollout batch of this rank's ``prompts`` (gathered over processes) and its
        generation seconds."""
        ro, t_generate = rollout(self.model, self.engine, prompts, self.cfg, self.tok, self.rt, self.mix, seeds,
                                 width, step=it + 1, with_reference=self.kl_measured)
        if self.rt.world_size > 1:
            ro = gather_rollout(ro, self.rt)
        return ro, t_generate

    def update(self, ro: Rollout, adv: dict, it: int) -> dict[str, list]:
        """Epochs over minibatches. Each global minibatch is cut into world x accum_steps near-equal
        chunks, chunk m going to rank m % world as its accumulation step m // world
        (MinibatchSplit): every rank makes the same number of forward/backward calls, so no rank
        waits at a collective alone."""
        a, rt = self.a, self.rt
        stats: dict[str, list] = {}
        for epoch in range(a.epochs):
            perm = self.permutation(it, epoch)
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

    def permutation(self, it: int, epoch: int) -> torch.Tensor:
        """The rollout's rows in this epoch's order: shuffled row by row, or, with ``share_prompt``
        and groups that fit the minibatches evenly, group by group (each minibatch holds whole
        groups, so a chunk runs each prompt once; verl's minibatches hold whole groups too)."""
        a = self.a
        g = torch.Generator().manual_seed(a.seed * 7919 + it * 131 + epoch)
        if a.shares_prompt and self.split.minibatch % a.group == 0:
            groups = torch.randperm(a.rollout_batch_size // a.group, generator=g)
            return (groups[:, None] * a.group + torch.arange(a.group)).flatten()
        return torch.randperm(a.rollout_batch_size, generator=g)

    def train_chunk(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor,
                    it: int) -> dict[str, float]:
        """Forward/backward of one chunk (the stage's ``chunk_loss``); the optimizer steps when
        accelerate's accumulation says so. ``minibatch``: the global minibatch's rows (``idx`` is
        this rank's chunk of it); ``it``: the iteration (1-based). Returns the chunk's statistics."""
        a, rt = self.a, self.rt
        with rt.accelerator.accumulate(self.engine):
            loss, vals, entropy = self.chunk_loss(ro, adv, idx, minibatch, it)
            check_loss(loss, it, self.section, rt)
            rt.accelerator.backward(loss)  # accelerate divides by the accumulation steps
            if rt.accelerator.sync_gradients:
                if a.max_grad_norm > 0:
                    rt.accelerator.clip_grad_norm_(self.params, a.max_grad_norm)
                self.optimizer.step()
                self.sched.step()
                self.optimizer.zero_grad(set_to_none=True)
        if entropy is not None:   # [rows, R], no gradient
            vals["policy/entropy"] = masked_mean(entropy, ro.response_mask[idx])
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in vals.items()}

    @property
    def kl_measured(self) -> bool:
        """Whether rollouts score the reference: not with a KL coefficient of 0 (Dr. GRPO / DAPO
        settings), which no controller moves away from 0 and nothing in the loss or reward reads."""
        return self.kl_ctl.value != 0

    def metrics(self, ro: Rollout, adv: dict, stats: dict, mean_kl: float, times: dict) -> dict:
        """The iteration's logged metrics (averaged over processes); ``objective/kl`` only when the
        reference was scored."""
        tokens = float(ro.response_mask.sum())
        logs = {
            **({"objective/kl": mean_kl} if self.kl_measured else {}), "objective/kl_coef": self.kl_ctl.value,
            "objective/scores": float(ro.scores.mean()), "objective/raw_scores": float(ro.raw_scores.mean()),
            "policy/entropy_rollout": float(masked_mean(-ro.logprobs, ro.response_mask)),
            "response/length": float(ro.response_mask.sum(1).float().mean()),
            "response/stop_rate": float(ro.has_stop.float().mean()), "lr": self.sched.get_last_lr()[0],
            "throughput/generated_tokens_per_s": tokens / max(times["generate"], 1e-9),
            "throughput/rollout_tokens_per_s": tokens / max(times["rollout"], 1e-9),
            "throughput/train_tokens_per_s": tokens * self.a.epochs / max(times["update"], 1e-9),
            "time/rollout_s": times["rollout"], "time/generate_s": times["generate"], "time/update_s": times["update"],
            **self.mix.metrics(ro.reward_parts), **self.extra_metrics(ro, adv, times),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        return self.rt.mean_across(logs)

    def evaluate(self, it: int) -> dict:
        return evaluate_policy(self.model, self.engine, self.eval_prompts, self.cfg, self.tok, self.rt, self.gold_fn,
                               it, self.st.tracker, self.mix)

    def iteration(self, it: int) -> dict:
        """Rollout, advantages, update and the KL controller's step of iteration ``it``; its logs."""
        p0 = self.model.passes
        ro, t_generate, t_rollout = self.rollout(it)
        p1 = self.model.passes
        adv = self.advantages(ro)
        t1 = time.time()
        stats = self.update(ro, adv, it)
        t_update = time.time() - t1
        stats["passes/rollout"], stats["passes/update"] = [p1 - p0], [self.model.passes - p1]
        mean_kl = self.rt.mean_across({"kl": float(adv["kl"].sum(1).mean())})["kl"]
        self.kl_ctl.update(mean_kl, self.a.rollout_batch_size)
        logs = self.metrics(ro, adv, stats, mean_kl, {"generate": t_generate, "rollout": t_rollout, "update": t_update})
        self.watch_entropy(it, logs["policy/entropy_rollout"])
        return logs

    def watch_entropy(self, it: int, entropy: float) -> None:
        """Warn once when the samples' mean token entropy falls below ``entropy_warn_fraction`` of
        its first value in this process's run (after a resume: of the first after resuming)."""
        first = getattr(self, "_first_entropy", None)
        if first is None:
            self._first_entropy, self._entropy_warned = entropy, False
        elif (self.a.entropy_warn_fraction and not self._entropy_warned and first > 0
              and entropy < self.a.entropy_warn_fraction * first):
            self._entropy_warned = True
            self.rt.print(f"[{self.section}] warning: iteration {it + 1}: the samples' mean token entropy fell to "
                          f"{entropy:.4f}, below {self.a.entropy_warn_fraction} x its first value {first:.4f} "
                          f"(entropy collapse: the policy is becoming deterministic; a lower lr, a higher kl_coef, "
                          f"or clip-higher in GRPO may help)")

    def save_checkpoint(self, it: int) -> None:
        save_resumable(self.rt, self.st.run_dir, it, self.model, self.optimizer, self.sched, self.a.keep_checkpoints,
                       stateful={"kl_controller": self.kl_ctl})

    def save_final(self) -> None:
        """The trained adapter sets and heads, and the roles record (``roles.json``)."""
        model, rt, run = self.model, self.rt, RunDir(self.st.run_dir)
        trained = [n for n in self.trained if n in model.adapters]
        heads = [h for h in self.trained if h in model.heads]
        with rt.gathered([p for n in trained for p in model.adapters[n].parameters()] +
                         [p for h in heads for p in model.heads[h].parameters()]):
            if rt.is_main:
                for n in trained:
                    save_adapter(model, n, run.adapter(n), backbone_name=self.backbone)
                for h in heads:
                    save_head(model, h, run.head(h))
                run.write_roles(roles_record(model, run, self.cfg.sft_run, self.cfg.reward_run, self.trained))


def run_online(cfg: OnlineStageConfig, loop_cls: type[OnlineLoop]) -> dict:
    """An online stage from its config: validated (every key, file and run dir) and its backbone
    and minibatch split settled before the run directory is written; then the iteration loop."""
    validate(cfg)
    problems = column_problems(cfg, [("data.prompts", cfg.data.prompts), ("data.eval_prompts", cfg.data.eval_prompts)])
    if problems:
        raise ConfigError("; ".join(problems))
    backbone = cfg.model.path or backbone_from_run(cfg.sft_run)["path"]
    split = minibatch_split(cfg.algo, world_size(), cfg.SECTION)
    return run_loop(loop_cls, cfg, backbone, split)


def run_loop(loop_cls: type[OnlineLoop], cfg: OnlineStageConfig, backbone: str, split: MinibatchSplit) -> dict:
    """The iteration loop: log, evaluate, checkpoint, stop; the stage's loop class does the
    rollouts and updates."""
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
            bar.set_postfix(score=f"{logs['objective/scores']:.3f}", kl=f"{logs.get('objective/kl', 0.0):.3f}")
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


def evaluate_policy(model, engine, eval_prompts, cfg: OnlineStageConfig, tok, rt, gold_fn, it, tracker,
                    mix: RewardMix) -> dict:
    """The policy on held-out prompts: mean reward, KL to the reference and the gold score when
    ``eval.gold`` names one; samples go to samples.jsonl / W&B."""
    a = cfg.algo
    prompts = eval_prompts[:cfg.eval.num_prompts]
    if not prompts:
        return {}
    gen = torch.Generator(device=rt.device).manual_seed(a.seed + 99991)
    res = evaluate_role(model, engine, prompts, tok, rt.device, role="policy", temperature=cfg.eval.temperature,
                        max_new_tokens=a.response_length, generator=gen, reward_mix=mix,
                        runtime=rt)
    out = {"eval/reward": float(res["reward"].mean()), "eval/kl": float(res["kl"].mean()),
           "eval/num_prompts": len(prompts)}
    rows = [{"prompt": p["text"], "response": r, "reward": float(s)}
            for p, r, s in zip(prompts, res["responses"], res["reward"])]
    if gold_fn is not None:
        gold = torch.tensor(call_scorer(gold_fn, prompts, res["responses"], res["ended"]), dtype=torch.float)
        out["eval/gold"] = float(gold.mean())
        out["eval/gold_sem"] = float(gold.std() / math.sqrt(len(gold))) if len(gold) > 1 else 0.0
        for row, gsc in zip(rows, gold.tolist()):
            row["gold"] = gsc
    tracker.log_samples(f"{cfg.SECTION}/samples", rows[:cfg.eval.num_samples_logged], it)
    return out


# ------------------------------------------------------------------------------------ critic-free groups
@dataclass
class GroupAlgoConfig(OnlineAlgoConfig):
    """GRPO's and RLOO's settings: ``group_size`` responses per prompt, advantages within a group."""
    rollout_batch_size: int = setting(
        64, "responses per iteration over all processes (prompts x group_size)", AT_LEAST_ONE)
    kl_coef: float = setting(0.04, "beta of the KL to the reference (SFT) policy", NON_NEGATIVE)
    group_size: int = setting(
        4, "responses sampled per prompt (GRPO's G, RLOO's k), >= 2", Range(2, integer=True))
    num_epochs: int = setting(1, "passes over each rollout batch (1: strictly on-policy)", AT_LEAST_ONE)
    dynamic_sampling: bool = setting(
        False,
        "DAPO's dynamic sampling: groups whose responses all score the same (no advantage, no gradient) are "
        "replaced by groups sampled from further prompts, up to dynamic_sampling_rounds extra rollouts per "
        "iteration; if still short, dropped groups fill the batch (counts logged as dynamic_sampling/*)")
    dynamic_sampling_rounds: int = setting(3, "the most extra rollouts per iteration for dynamic_sampling",
                                           NON_NEGATIVE)
    overlong_buffer: int = setting(
        0,
        "DAPO's soft overlong penalty: 0 off; else a response longer than response_length - overlong_buffer "
        "tokens loses up to overlong_penalty, linearly, reached at response_length", NON_NEGATIVE)
    overlong_penalty: float = setting(1.0, "the soft overlong penalty's largest value", NON_NEGATIVE)

    def checks(self, at: str) -> Iterator[str]:
        if isinstance(self.overlong_buffer, int) and isinstance(self.response_length, int) \
                and self.overlong_buffer > self.response_length >= 1:
            yield (f"{at}overlong_buffer={self.overlong_buffer}: at most response_length={self.response_length} "
                   f"(the penalty starts overlong_buffer tokens before the limit)")

    @property
    def group(self) -> int:
        return self.group_size

    @property
    def epochs(self) -> int:
        return self.num_epochs


class GroupLoop(OnlineLoop):
    """The critic-free loop: group-relative advantages (the stage's ``advantages``) and the
    stage's ``loss`` over the policy's log-probs of a chunk."""

    def loss(self, logprobs: torch.Tensor, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor):
        raise NotImplementedError

    def denominator(self, ro: Rollout, minibatch: torch.Tensor, tokens: bool = False,
                    ended_only: bool = False) -> float:
        """A chunk's share of its global minibatch's response (or token) count: a chunk's loss is
        its sum divided by this, so that after accelerate's division by the accumulation steps and
        the mean over processes the minibatch's loss is its plain mean, however the minibatch is
        cut into chunks (``MinibatchSplit``). ``ended_only``: count only the tokens of responses that
        ended with a stop token (the others are left out of the loss)."""
        mask = ro.response_mask & ro.has_stop[:, None].bool() if ended_only else ro.response_mask
        count = float(mask[minibatch].sum()) if tokens else float(len(minibatch))
        return count / (self.split.accum_steps * self.split.world)

    def rollout(self, it: int) -> tuple[Rollout, float, float]:
        """The group rollout: the soft overlong penalty on the scores and, with dynamic sampling,
        groups without an advantage replaced by further ones (DAPO)."""
        t0 = time.time()
        ro, t_generate = self.sample_batch(*self.order(it), it)
        ro = self.penalise_overlong(ro)
        if self.a.dynamic_sampling:
            ro, t_more = self.refill(ro, it)
            t_generate += t_more
        return ro, t_generate, time.time() - t0

    def penalise_overlong(self, ro: Rollout) -> Rollout:
        a = self.a
        if not a.overlong_buffer:
            return ro
        pen = overlong_penalty(ro.response_mask.sum(1), a.response_length, a.overlong_buffer, a.overlong_penalty)
        self._overlong = float(pen.mean())
        return dataclasses.replace(ro, scores=ro.scores + pen.to(ro.scores.dtype),
                                   raw_scores=ro.raw_scores + pen.to(ro.raw_scores.dtype))

    def informative(self, ro: Rollout) -> torch.Tensor:
        """[groups] bool: the groups whose responses do not all score the same."""
        g = ro.scores.view(-1, self.a.group_size)
        return (g.max(1).values - g.min(1).values) > 1e-6

    def refill(self, ro: Rollout, it: int) -> tuple[Rollout, float]:
        """DAPO's dynamic sampling: keep the informative groups, sample further prompts (up to
        ``dynamic_sampling_rounds`` rollouts) until the batch is full of them, and fill what is still
        missing with the first rollout's uninformative groups. Every rank makes the same choice
        (the batch is global)."""
        a, n = self.a, ro.scores.numel() // self.a.group_size
        keep = self.informative(ro)
        pieces, have, rounds, seconds = [(ro, keep.nonzero().flatten())], int(keep.sum()), 0, 0.0
        first_dropped = int(n - have)
        while have < n and rounds < a.dynamic_sampling_rounds:
            rounds += 1
            more, t = self.sample_batch(*self.order.extra(it, rounds), it)
            more = self.penalise_overlong(more)
            seconds += t
            k = self.informative(more).nonzero().flatten()
            pieces.append((more, k))
            have += len(k)
        chosen, left = [], n
        for r, groups in pieces:
            take = groups[:left]
            chosen.append((r, take))
            left -= len(take)
        if left:   # still short: the uninformative groups of the first rollout
            chosen.append((ro, (~keep).nonzero().flatten()[:left]))
        self._dynamic = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/dropped_groups": first_dropped,
                         "dynamic_sampling/filled_uninformative": left}
        return concat_groups(chosen, a.group_size, self.tok.pad_token_id), seconds

    def extra_metrics(self, ro: Rollout, adv: dict, times: dict) -> dict:
        out = {"objective/advantage_abs": float(adv["advantages"].abs().mean())}
        if self.a.overlong_buffer:
            out["objective/overlong_penalty"] = getattr(self, "_overlong", 0.0)
        if self.a.dynamic_sampling:
            out.update(getattr(self, "_dynamic", {}))
        return out

    def chunk_loss(self, ro: Rollout, adv: dict, idx: torch.Tensor, minibatch: torch.Tensor, it: int):
        out = response_stats(self.engine, ro.query[idx], ro.query_mask[idx], ro.response[idx],
                             ro.response_mask[idx], ("policy",), self.a.temperature,
                             shared_prompt=self.a.shares_prompt)["policy"]
        loss, stats = self.loss(out["logprobs"], ro, adv, idx, minibatch)
        return loss, {"policy/loss": loss, **{f"policy/{k}": v for k, v in stats.items()}}, None


def concat_groups(chosen: list[tuple[Rollout, torch.Tensor]], group_size: int, pad_id: int) -> Rollout:
    """One rollout of the given groups (``(rollout, group indices)`` pairs, in order): prompts
    left-padded and responses right-padded to the widest, the pads masked out and zero."""
    rows = [(r, (g[:, None] * group_size + torch.arange(group_size, device=g.device)).flatten())
            for r, g in chosen if len(g)]
    q_width = max(r.query.shape[1] for r, _ in rows)
    r_width = max(r.response.shape[1] for r, _ in rows)
    out: dict[str, list] = {}
    for r, idx in rows:
        idx = idx.to(r.scores.device)
        for f in dataclasses.fields(Rollout):
            t = getattr(r, f.name)[idx]
            if f.name in ("query", "query_mask"):
                fill = pad_id if f.name == "query" else 0
                t = torch.nn.functional.pad(t, (q_width - t.shape[1], 0), value=fill)
            elif t.dim() == 2 and f.name != "reward_parts":
                fill = pad_id if f.name == "response" else 0
                t = torch.nn.functional.pad(t, (0, r_width - t.shape[1]), value=fill)
            out.setdefault(f.name, []).append(t)
    return Rollout(**{k: torch.cat(v) for k, v in out.items()})
