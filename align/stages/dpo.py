"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from preference pairs and
K-wise rankings directly, with the SFT adapters as the frozen reference and no reward model.

``align dpo CONFIG`` writes::

    adapters/policy/   (peft layout where the method has one; ``align eval policy_b=RUN_DIR`` reads it)
    roles.json         (the policy's adapter stack, with paths, and the reference)
    config.yaml backbone.json metrics.jsonl samples.jsonl summary.json checkpoints/ wandb/

* **Data**: the reward stage's records (pairs and K-wise rankings, ``align.data.preferences``),
  split by prompt, tokenized the same way (a completion ends at its first stop token,
  align/tokens.py). A group's K completions go through one forward; a ranking contributes all its
  ordered pairs, averaged so each prompt counts as one unit (``align.rl.losses.dpo_loss``), or its
  Plackett-Luce likelihood (``dpo.loss=plackett_luce``). Ties are skipped.
* **Sequence log-prob** = sum of the completion tokens' log-probs (prompt tokens excluded; logits
  are computed at the completion positions only).
* **Reference** = the SFT adapters, frozen, dropout off. ``dpo.reference=precompute`` (default):
  its log-probs are computed once per example before training (TRL's ``precompute_ref_log_probs``),
  under ``torch.no_grad`` in fixed batches, so a training step is one policy forward per
  micro-batch (one module call per backward for DDP/DeepSpeed) and holds no reference activations;
  they are recomputed identically on resume. ``dpo.reference=batch``: a separate ``no_grad``
  forward of the reference role per micro-batch, before the policy's (no graph is kept for it,
  and DDP registers no gradient hooks for a no-grad forward).
* **Policy**: ``init=sft_copy`` (default: a trainable copy of the SFT adapters, so policy ==
  reference at step 0: loss log 2, margins 0) or ``sft_stack`` (the frozen SFT adapters with a new
  set of ``adapter.*`` on top; ``roles.json`` records the stack for ``align eval``).
* **Evaluation** (held-out prompts; at step 0, every ``train.eval_every`` steps and at the end):
  implicit-reward accuracy and margin, the loss, chosen/rejected rewards; and the mean summed KL
  of the policy to the reference on samples from the policy for ``eval.kl_prompts`` held-out prompts
  (``eval/kl``: exact per token given the sampled prefix; ``eval/kl_sampled``: the log-ratio
  estimate PPO and ``align eval`` report, noisier and possibly negative).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from align.adapters.base import AdapterConfig
from align.adapters.peft_format import load_adapter, save_adapter
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
from align.data.preferences import TokenGroup, collate_groups, tokenize_train_and_eval
from align.data.sft import encode_prompts
from align.guard import stage_entry
from align.hub import RecordsPath
from align.lmhead import logprobs_at
from align.rl.losses import counts_in_loss, dpo_loss
from align.rules import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    OneOf,
    Range,
    setting,
)
from align.rundir import RunDir
from align.scoring import decode, generate, response_stats
from align.stages.common import backbone_from_run, finish_stage, start_stage
from align.trainer import Trainer, eval_mode

LOSSES = ("sigmoid", "ipo", "plackett_luce")


@dataclass
class DPODataConfig:
    train: str = setting(
        "",
        "pairs or K-wise rankings (the reward stage's records); or a Hub dataset id org/name[:split] "
        "in the local HF cache",
        RecordsPath(required=True, what="a records file"))
    eval: str = setting("", "optional held-out file; else eval_fraction of train by prompt", RecordsPath())
    eval_fraction: float = setting(0.1, "split by prompt: no prompt is on both sides", FRACTION)
    max_length: int = setting(512, "tokens per prompt+completion", AT_LEAST_ONE)
    chat_template: Optional[str] = setting(None, "Jinja template for tokenizers without one")
    chat: bool = setting(False, "plain-text prompts/completions as a user and an assistant turn (chat template)")


@dataclass
class DPOOptions:
    beta: float = setting(0.1, "DPO's beta: implicit reward = beta * (log pi - log pi_ref)", POSITIVE)
    loss: str = setting(
        "sigmoid",
        "sigmoid (DPO) | ipo (Azar et al.) | plackett_luce (listwise rankings)",
        OneOf(*LOSSES))
    label_smoothing: float = setting(
        0.0,
        "conservative DPO's eps, the assumed label-noise rate (sigmoid only)",
        Range(0, 0.5, hi_open=True))
    ipo_logps: str = setting(
        "mean",
        "IPO's log-ratios: mean (per completion token: TRL, the IPO authors) | sum (Azar et al. eq. 17 literally; "
        "beta then depends on the lengths)",
        OneOf("mean", "sum"))
    reference: str = setting(
        "precompute",
        "precompute: reference log-probs once per example before training | batch: a no-grad reference forward per "
        "micro-batch",
        OneOf("precompute", "batch"))

    def checks(self, at: str) -> Iterator[str]:
        if self.ipo_logps != "mean" and self.loss != "ipo":
            yield f"{at}ipo_logps={self.ipo_logps!r}: applies to loss=ipo only (loss={self.loss})"
        if self.label_smoothing and self.loss != "sigmoid":
            yield (f"{at}label_smoothing={self.label_smoothing!r}: conservative DPO applies to loss=sigmoid only "
                   f"(loss={self.loss})")


@dataclass
class DPOEvalConfig:
    kl_prompts: int = setting(
        32,
        "held-out prompts sampled from the policy for its KL to the reference (0: off)",
        NON_NEGATIVE)
    max_new_tokens: int = setting(48, "length of those samples", AT_LEAST_ONE)
    temperature: float = setting(1.0, "their sampling temperature (and of the KL's log-probs)", POSITIVE)


@dataclass
class DPOConfig:
    output_dir: str = setting("runs/dpo", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    sft_run: str = setting("", "the SFT run dir (backbone; its adapters are the reference)")
    init: str = setting(
        "sft_copy",
        "sft_copy: trainable copy of the SFT adapters | sft_stack: frozen SFT adapters + a new set (adapter.*) on top",
        OneOf("sft_copy", "sft_stack"))
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=1.0))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def checks(self, at: str) -> Iterator[str]:
        if not self.output_dir:
            yield f"{at}output_dir: required"
        yield from run_dir_problems(self.sft_run, f"{at}sft_run", "sft")
        yield from backbone_problems(self.model.path, self.sft_run, f"{at}model.path")
        yield from ignored_adapter_settings(self.init, self.adapter, self.sft_run, at)


def build_dpo_roles(model, cfg: DPOConfig) -> tuple[list[dict], list[str]]:
    """Reference = [sft] (frozen) and the trainable policy; returns (the policy's stack for
    roles.json, the frozen adapter sets)."""
    sft_dir = RunDir(cfg.sft_run).adapter("sft")
    load_adapter(model, "sft", sft_dir)
    model.add_role("reference", ["sft"])
    if cfg.init == "sft_copy":
        model.copy_adapter("sft", "policy")
        model.add_role("policy", ["policy"])
        stack = [{"name": "policy", "dir": "adapters/policy"}]
    elif cfg.init == "sft_stack":
        model.add_adapter("policy", cfg.adapter)
        model.add_role("policy", ["sft", "policy"])
        stack = [{"name": "sft", "dir": str(sft_dir.resolve())}, {"name": "policy", "dir": "adapters/policy"}]
    else:
        raise ConfigError(f"init={cfg.init!r}: choose sft_copy or sft_stack")
    model.set_trainable(["policy"])
    return stack, ["sft"]


def sequence_logprobs(model, batch: dict, role: str) -> torch.Tensor:
    """[N] summed log-probs of each row's completion tokens (``completion_mask``) under ``role``;
    logits only at the positions that predict them."""
    cm = batch["completion_mask"]
    sel = torch.zeros_like(cm)
    sel[:, :-1] = cm[:, 1:]
    targets = batch["input_ids"][:, 1:][sel[:, :-1]]
    lp = logprobs_at(model, batch["input_ids"], batch["attention_mask"], sel.bool(), targets, role=role)
    rows = sel.nonzero(as_tuple=True)[0]
    return torch.zeros(cm.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


@torch.no_grad()
def group_logprobs(model, groups: list[TokenGroup], pad_id: int, device, batch_size: int,
                   role: str) -> list[torch.Tensor]:
    """Summed completion log-probs of every completion of every group under ``role``, in fixed
    batches of ``batch_size`` groups (dropout off): one [K] tensor per group, on the CPU."""
    out = []
    with eval_mode(model):
        for i in range(0, len(groups), batch_size):
            chunk = groups[i:i + batch_size]
            b = collate_groups(chunk, pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            lp = sequence_logprobs(model, b, role).float().cpu()
            out.extend(lp[b["group"].cpu() == g] for g in range(len(chunk)))
    return out


def collate_dpo(items: list[tuple[TokenGroup, Optional[torch.Tensor]]], pad_id: int) -> dict:
    batch = collate_groups([g for g, _ in items], pad_id)
    if items and items[0][1] is not None:
        batch["ref_logps"] = torch.cat([r for _, r in items])
    return batch


def dpo_loss_fn(model, o: DPOOptions, frozen: list[str]):
    """The Trainer's loss: one policy forward per micro-batch; the reference log-probs come with the
    batch (precomputed) or from a no-grad forward of the reference role."""
    def loss_fn(engine, batch):
        for name in frozen:  # frozen sets never run dropout (the reference is deterministic)
            model.adapters[name].eval()
        ref = batch.get("ref_logps")
        if ref is None:
            with torch.no_grad():
                ref = sequence_logprobs(engine, batch, "reference")
        pol = sequence_logprobs(engine, batch, "policy")
        return dpo_loss(pol, ref.to(pol.dtype), batch["ranks"], batch["group"], len(batch["weight"]), o.beta,
                        o.loss, o.label_smoothing, batch["weight"], batch.get("loss_norm"),
                        batch["completion_mask"].sum(1), o.ipo_logps)
    return loss_fn


def _flat(groups: list[TokenGroup], logps: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    ranks = torch.tensor([r for g in groups for r in g.ranks], dtype=torch.float)
    group = torch.tensor([i for i, g in enumerate(groups) for _ in g.sequences])
    weight = torch.tensor([g.weight for g in groups])
    lengths = torch.tensor([len(s) - p for g in groups for s, p in zip(g.sequences, g.prompt_lengths)])
    return torch.cat(logps), ranks, group, weight, lengths


def preference_eval(policy: list[torch.Tensor], ref: list[torch.Tensor], groups: list[TokenGroup],
                    o: DPOOptions) -> dict:
    """Held-out loss, implicit-reward accuracy (a tie counts 1/2) and margin over all ordered pairs."""
    pol, ranks, group, weight, lengths = _flat(groups, policy)
    loss, st = dpo_loss(pol, torch.cat(ref), ranks, group, len(groups), o.beta, o.loss, o.label_smoothing, weight,
                        lengths=lengths, ipo_logps=o.ipo_logps)
    return {"eval/loss": float(loss), "eval/accuracy": float(st["accuracy"]), "eval/margin": float(st["margin"]),
            "eval/rewards/chosen": float(st["rewards/chosen"]), "eval/rewards/rejected": float(st["rewards/rejected"]),
            "eval/pairs": int(st["pairs"])}


@torch.no_grad()
def policy_kl(model, resp, temperature: float, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response, the KL of the policy to the reference summed over its tokens: exact at each
    sampled prefix (sum over the vocabulary, so never negative), and the sampled estimate
    ``sum log pi - log pi_ref`` that PPO and ``align eval`` report."""
    exact, sampled = [], []
    for i in range(0, resp.response.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        st = response_stats(model, resp.query[sl], resp.query_mask[sl], resp.response[sl], resp.response_mask[sl],
                            ("policy", "reference"), temperature, logits=True)
        m = resp.response_mask[sl].float()
        lp = torch.log_softmax(st["policy"]["logits"].float() / temperature, -1)
        lr = torch.log_softmax(st["reference"]["logits"].float() / temperature, -1)
        exact.append(((lp.exp() * (lp - lr)).sum(-1) * m).sum(1).cpu())
        sampled.append(((st["policy"]["logprobs"] - st["reference"]["logprobs"]).float() * m).sum(1).cpu())
    return torch.cat(exact), torch.cat(sampled)


@stage_entry
def run(cfg: DPOConfig) -> dict:
    validate(cfg)  # everything, before the run directory is written
    backbone = cfg.model.path or backbone_from_run(cfg.sft_run)["path"]
    groups, eval_groups, has_eval = load_preference_splits(cfg.data)

    st = start_stage(cfg, "dpo", backbone)
    rt, tok, model = st.rt, st.tokenizer, st.model
    stack, frozen = build_dpo_roles(model, cfg)
    model.activate("policy")
    tgroups, egroups, truncation = tokenize_train_and_eval(groups, eval_groups, tok, cfg.data, rt.print, "dpo")

    o, bs, pad = cfg.dpo, cfg.train.batch_size, tok.pad_token_id
    if o.reference == "precompute":  # deterministic: the same values again on resume
        train_ref = group_logprobs(model, tgroups, pad, rt.device, bs, "reference")
    else:
        train_ref = [None] * len(tgroups)
    eval_ref = group_logprobs(model, egroups, pad, rt.device, bs, "reference") if has_eval else []
    prompts, seen = [], set()
    for g in eval_groups:  # distinct held-out prompts for the KL samples
        key = json.dumps(g.prompt, sort_keys=True)
        if key not in seen and len(prompts) < cfg.eval.kl_prompts:
            seen.add(key)
            prompts.append({"prompt": g.prompt})
    kl_prompts = encode_prompts(prompts, "eval prompts", tok, cfg.data.chat_template, cfg.data.max_length)

    def evaluate(step: int) -> dict:
        model.eval()
        res = preference_eval(group_logprobs(model, egroups, pad, rt.device, bs, "policy"), eval_ref, egroups, o)
        if kl_prompts:
            with torch.no_grad():
                gen = torch.Generator(device=rt.device).manual_seed(cfg.train.seed + 4242)
                resp = generate(model, [p["ids"] for p in kl_prompts], tok, rt.device, role="policy",
                                max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                                generator=gen, runtime=rt)
                kl, kl_sampled = policy_kl(model, resp, cfg.eval.temperature, bs)
            res.update({"eval/kl": float(kl.mean()), "eval/kl_sampled": float(kl_sampled.mean()),
                        "eval/response_length": float(resp.response_mask.sum(1).float().mean()),
                        "eval/stop_rate": float(resp.has_stop.float().mean())})
            rows = [{"prompt": p["text"], "completion": c} for p, c in zip(kl_prompts[:4], decode(tok, resp)[:4])]
            st.tracker.log_samples("dpo/samples", rows, step)
        return res

    trainer = Trainer("dpo", st.run_dir, cfg.train, rt, model, list(zip(tgroups, train_ref)),
                      lambda items: collate_dpo(items, pad), dpo_loss_fn(model, o, frozen), st.tracker,
                      eval_fn=evaluate if has_eval else None, dtype=cfg.model.dtype,
                      loss_units=lambda item: counts_in_loss(item[0].ranks))
    result = trainer.run(resume=cfg.resume)
    if "stopped_at" in result:
        st.tracker.finish()
        return result
    with rt.gathered(list(model.adapters["policy"].parameters())):
        if rt.is_main:
            run = RunDir(st.run_dir)
            save_adapter(model, "policy", run.adapter("policy"), backbone_name=backbone)
            run.write_roles({"policy": {"adapters": stack}, "reference": {"adapters": [
                {"name": "sft", "dir": str(RunDir(cfg.sft_run).adapter("sft").resolve())}]}})
    summary = {"stage": "dpo", **result, "loss_kind": o.loss, "beta": o.beta, "reference": o.reference,
               "init": cfg.init, "train_groups": len(tgroups), "eval_groups": len(egroups), "truncation": truncation,
               "trainable_params": model.adapters["policy"].num_params(),
               "backbone_params": model.backbone_num_params()}
    return finish_stage(st, summary, "policy")
