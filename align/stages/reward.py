"""Stage 2: a reward model = backbone + reward adapter set + scalar head, on ranked comparisons.

``align reward CONFIG`` writes::

    adapters/reward/   heads/reward/ (head.json holds the normalisation mean/std)
    roles.json         (the reward role: the adapter stack PPO must rebuild, with paths, its head and normalisation)
    config.yaml backbone.json metrics.jsonl summary.json checkpoints/ wandb/

The reward role starts from the SFT adapters (``init: sft_copy``: a trainable copy;
``sft_stack``: frozen SFT adapters with a new trainable set on top) or from the bare backbone
(``init: base``). Training shares the SFT stage's loop, checkpoints and exact resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from align.adapters.base import AdapterConfig
from align.adapters.peft_format import load_adapter, save_adapter, save_head
from align.config import (
    ConfigError,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    backbone_problems,
    ignored_adapter_settings,
    run_dir_problems,
    validate,
)
from align.data.common import load_preference_splits
from align.data.preferences import collate_groups, tokenize_train_and_eval
from align.data.sft import prompt_text
from align.rl.losses import counts_in_loss, kwise_loss, ranking_pairs
from align.hub import RecordsPath
from align.rules import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, OneOf, setting
from align.rundir import RunDir
from align.scoring import generate, left_pad, score, sequence_rewards
from align.stages.common import backbone_from_run, finish_stage, start_stage
from align.tokens import encode
from align.trainer import Trainer
from align.guard import stage_entry


@dataclass
class RewardDataConfig:
    train: str = setting(
        "",
        "pairs or K-wise rankings (canonical or TRL records); or a Hub dataset id org/name[:split] "
        "in the local HF cache",
        RecordsPath(required=True, what="a records file"))
    eval: str = setting("", "optional held-out file; else eval_fraction of train by prompt", RecordsPath())
    eval_fraction: float = setting(0.1, "split by prompt: no prompt is on both sides", FRACTION)
    max_length: int = setting(512, "tokens per prompt+completion", AT_LEAST_ONE)
    chat_template: str | None = setting(None, "Jinja template for tokenizers without one")
    chat: bool = setting(False, "plain-text prompts/completions as a user and an assistant turn (chat template)")
    ties: str = setting("skip", "skip | half (a tie is a Bradley-Terry target of 1/2)", OneOf("skip", "half"))


@dataclass
class NormalizeConfig:
    source: str = setting(
        "sft_samples",
        "sft_samples | best_completions | none",
        OneOf("sft_samples", "best_completions", "none"))
    num_prompts: int = setting(64, "held-out prompts sampled for the statistics", NON_NEGATIVE)
    max_new_tokens: int = setting(48, "length of those samples", AT_LEAST_ONE)
    temperature: float = setting(
        0.7,
        "their sampling temperature: use the policy stage's (ppo/grpo/rloo .temperature), so its normalised step-0 "
        "scores have mean 0, std 1",
        POSITIVE)


@dataclass
class RewardConfig:
    output_dir: str = setting("runs/reward", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    sft_run: str = setting("", "the SFT run dir (gives backbone and SFT adapters)")
    init: str = setting("sft_copy", "sft_copy | sft_stack | base", OneOf("sft_copy", "sft_stack", "base"))
    center_coef: float = setting(
        0.0,
        "reward centering (TRL's center_rewards_coefficient): adds coef * (sum of a group's rewards)^2 per group "
        "(pairs: (r_c + r_r)^2)",
        NON_NEGATIVE)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=1.0))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def checks(self, at: str) -> Iterator[str]:
        if not self.output_dir:
            yield f"{at}output_dir: required"
        if self.init in ("sft_copy", "sft_stack") or self.sft_run:
            for p in run_dir_problems(self.sft_run, f"{at}sft_run", "sft"):
                yield p + ("" if self.sft_run else f"; init={self.init} starts from its adapters (or use init=base)")
        elif not self.model.path:
            yield f"{at}model.path: required with init=base and no sft_run (the backbone)"
        yield from backbone_problems(self.model.path, self.sft_run, f"{at}model.path")
        yield from ignored_adapter_settings(self.init, self.adapter, self.sft_run, at)


def build_reward_role(model, cfg: RewardConfig) -> list[dict]:
    """Adds the reward role; returns the stack description written to roles.json."""
    stack = []
    if cfg.init in ("sft_copy", "sft_stack"):
        if not cfg.sft_run:
            raise ConfigError(f"init={cfg.init} needs sft_run (or use init=base)")
        sft_dir = RunDir(cfg.sft_run).adapter("sft")
        load_adapter(model, "sft", sft_dir)
        if cfg.init == "sft_copy":
            model.copy_adapter("sft", "reward")
            names = ["reward"]
        else:
            model.add_adapter("reward", cfg.adapter)
            names = ["sft", "reward"]
            stack.append({"name": "sft", "dir": str(sft_dir.resolve())})
    elif cfg.init == "base":
        model.add_adapter("reward", cfg.adapter)
        names = ["reward"]
    else:
        raise ConfigError(f"init={cfg.init!r}: choose sft_copy, sft_stack or base")
    stack.append({"name": "reward", "dir": "adapters/reward"})
    model.add_head("reward", init="reward")
    model.add_role("reward", names, head="reward")
    model.set_trainable(["reward"])
    if not cfg.center_coef:
        # The Bradley-Terry loss is invariant to a shift of every reward, so the head's bias gets
        # only round-off gradients, which Adam would blow up into +-lr steps of noise; the scale is
        # set after training by the normalisation statistics instead.
        model.heads["reward"].linear.bias.requires_grad_(False)
    return stack


def reward_loss_fn(center_coef: float, ties: str):
    def loss_fn(model, batch):
        out = model(batch["input_ids"], batch["attention_mask"])
        r = sequence_rewards(out.values, batch["attention_mask"])
        return kwise_loss(r, batch["ranks"], batch["group"], len(batch["weight"]), batch["margin"],
                          batch["weight"], ties, center_coef, batch.get("loss_norm"))
    return loss_fn


@torch.no_grad()
def score_groups(model, groups, pad_id, device, batch_size) -> list[torch.Tensor]:
    """Rewards of every completion of every group (reward role active)."""
    out = []
    for i in range(0, len(groups), batch_size):
        b = collate_groups(groups[i:i + batch_size], pad_id)
        r = sequence_rewards(model(b["input_ids"].to(device), b["attention_mask"].to(device)).values,
                             b["attention_mask"].to(device)).cpu()
        out.extend(r[b["group"] == g] for g in range(len(groups[i:i + batch_size])))
    return out


def pairwise_eval(scores: list[torch.Tensor], groups) -> dict:
    """Held-out accuracy, mean margin and calibration (accuracy by predicted-probability bucket)."""
    d_all = []
    for s, g in zip(scores, groups):
        ranks = torch.tensor(g.ranks, dtype=torch.float)
        i, j, _, _ = ranking_pairs(ranks, torch.zeros(len(ranks), dtype=torch.long))
        d_all.append(s[i] - s[j])
    d = torch.cat(d_all) if d_all else torch.zeros(0)
    res = {"eval/accuracy": float((d > 0).float().mean()) if len(d) else float("nan"),
           "eval/margin": float(d.mean()) if len(d) else float("nan"), "eval/pairs": len(d)}
    conf = torch.sigmoid(d.abs())  # the model's probability for the pair order it predicts
    edges = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf >= lo) & (conf < hi)
        if sel.any():
            res[f"eval/calibration/{lo:.1f}-{min(hi, 1.0):.1f}"] = float((d[sel] > 0).float().mean())
            res[f"eval/calibration_n/{lo:.1f}-{min(hi, 1.0):.1f}"] = int(sel.sum())
    return res


@stage_entry
def run(cfg: RewardConfig) -> dict:
    validate(cfg)  # everything, before the run directory is written
    backbone = cfg.model.path or (backbone_from_run(cfg.sft_run)["path"] if cfg.sft_run else "")
    groups, eval_groups, has_eval = load_preference_splits(cfg.data)

    st = start_stage(cfg, "reward", backbone)
    rt, tok, model = st.rt, st.tokenizer, st.model
    stack = build_reward_role(model, cfg)
    model.activate("reward")
    tgroups, egroups, truncation = tokenize_train_and_eval(groups, eval_groups, tok, cfg.data, rt.print, "reward")

    def evaluate(step: int) -> dict:
        model.eval()
        with model.use("reward"):
            scores = score_groups(model, egroups, tok.pad_token_id, rt.device, cfg.train.batch_size)
        return pairwise_eval(scores, egroups)

    trainer = Trainer("reward", st.run_dir, cfg.train, rt, model, tgroups,
                      lambda gs: collate_groups(gs, tok.pad_token_id),
                      reward_loss_fn(cfg.center_coef, cfg.data.ties), st.tracker,
                      eval_fn=evaluate if has_eval else None, dtype=cfg.model.dtype,
                      loss_units=lambda g: counts_in_loss(g.ranks, cfg.data.ties))
    result = trainer.run(resume=cfg.resume)
    if "stopped_at" in result:
        st.tracker.finish()
        return result
    norm = reward_normalisation(model, tok, cfg, eval_groups, rt)
    with rt.gathered(list(model.adapters["reward"].parameters()) + list(model.heads["reward"].parameters())):
        if rt.is_main:
            run = RunDir(st.run_dir)
            save_adapter(model, "reward", run.adapter("reward"), backbone_name=backbone)
            save_head(model, "reward", run.head("reward"), extra={"normalisation": norm})
            run.write_roles({"reward": {"adapters": stack, "head": "heads/reward", "normalisation": norm}})
    summary = {"stage": "reward", **result, "normalisation": norm, "train_groups": len(tgroups),
               "eval_groups": len(egroups), "truncation": truncation, "trainable_params": model.role_num_params("reward"),
               "backbone_params": model.backbone_num_params()}
    return finish_stage(st, summary, "reward")


@torch.no_grad()
def reward_normalisation(model, tok, cfg: RewardConfig, eval_groups, rt) -> dict:
    """Mean and std of the reward over reference responses (Stiennon et al.: the SFT policy's
    samples on held-out prompts), so PPO can use normalised rewards."""
    n = cfg.normalize
    if n.source == "none":
        return {"mean": 0.0, "std": 1.0, "source": "none", "n": 0}
    prompts = [g.prompt for g in eval_groups][:n.num_prompts]
    if not prompts:
        return {"mean": 0.0, "std": 1.0, "source": "none (no held-out prompts)", "n": 0}
    if n.source == "sft_samples" and "sft" in model.adapters:
        if "sft" not in model.roles:
            model.add_role("sft", ["sft"])
        ids = [encode(tok, prompt_text(p, tok, cfg.data.chat_template), bos=True) for p in prompts]
        g = torch.Generator(device=rt.device).manual_seed(cfg.train.seed + 17)
        resp = generate(model, ids, tok, rt.device, role="sft", max_new_tokens=n.max_new_tokens,
                        temperature=n.temperature, generator=g, runtime=rt)
        r = score(model, resp, ("reward",), n.temperature, cfg.train.batch_size)["reward"]["score"].float()
        return {**_norm_stats(r, "sft_samples"), "temperature": n.temperature}
    else:
        from align.data.sft import tokenize_pair
        seqs = []
        for grp in eval_groups[:n.num_prompts]:
            best = grp.completions[min(range(len(grp.ranks)), key=lambda k: grp.ranks[k])]
            if isinstance(grp.prompt, str) and isinstance(best, str):
                pi, ci = tokenize_pair(grp.prompt, best, tok, cfg.data.max_length)
                seqs.append(pi + ci)
        source = "best_completions"
    ids, mask = left_pad(seqs, tok.pad_token_id, rt.device)
    with model.use("reward"):
        r = sequence_rewards(model(ids, mask).values, mask).float()
    return _norm_stats(r, source)


def _norm_stats(r: torch.Tensor, source: str) -> dict:
    std = float(r.std()) if len(r) > 1 else 1.0
    return {"mean": float(r.mean()), "std": std if math.isfinite(std) and std > 0 else 1.0,
            "source": source, "n": len(r)}
