"""Stage 1: instruction tuning (SFT) of an adapter set over the frozen backbone.

``align sft CONFIG [key=value ...]`` writes a run directory::

    config.yaml  backbone.json  metrics.jsonl  samples.jsonl  summary.json
    adapters/sft/          (peft layout where the method has one)
    checkpoints/step_N/    (exact resume: resume=true)
    wandb/
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from align.adapters.base import AdapterConfig
from align.adapters.peft_format import save_adapter
from align.config import ModelConfig, TrackingConfig, TrainConfig, require_file, validate
from align.data.common import check_eval_split, read_records, require_records, split_by_prompt
from align.data.sft import Collator, build_examples, pack, render
from align.lmhead import logprobs_at
from align.rl.losses import label_positions, lm_loss_at
from align.hub import RecordsPath
from align.rules import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, OneOf, setting
from align.rundir import RunDir
from align.scoring import decode, generate
from align.stages.common import finish_stage, start_stage
from align.tokens import encode
from align.trainer import Trainer
from align.guard import stage_entry


@dataclass
class SFTDataConfig:
    train: str = setting(
        "",
        "canonical/TRL records: JSONL, JSON, Parquet or a datasets dir; or a Hub dataset id org/name[:split] in the "
        "local HF cache",
        RecordsPath(required=True, what="a records file"))
    eval: str = setting("", "optional held-out file; else eval_fraction of train by prompt", RecordsPath())
    eval_fraction: float = setting(0.05, "held-out share of prompts when data.eval is empty", FRACTION)
    max_length: int = setting(512, "tokens per example (the prompt is cut first, counted)", AT_LEAST_ONE)
    completion_only_loss: bool = setting(True, "false: loss on the prompt tokens too")
    train_turns: str = setting(
        "all",
        "messages records: all (every assistant turn is trained, as TRL's assistant_only_loss) | last (only the "
        "last one; earlier turns are prompt)",
        OneOf("all", "last"))
    packing: bool = setting(False, "pack examples into max_length rows (attention kept within each example)")
    chat_template: Optional[str] = setting(None, "Jinja template for tokenizers without one")
    chat: bool = setting(False, "plain-text prompts/completions as a user and an assistant turn (chat template)")
    num_samples: int = setting(4, "samples generated at each evaluation", NON_NEGATIVE)
    max_new_tokens: int = setting(48, "length of the eval samples", AT_LEAST_ONE)


@dataclass
class SFTConfig:
    output_dir: str = setting("runs/sft", "the run directory")
    resume: bool = setting(False, "continue the run in output_dir from its latest checkpoint")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def checks(self, at: str) -> Iterator[str]:
        if not self.output_dir:
            yield f"{at}output_dir: required"
        if not self.model.path:
            yield f"{at}model.path: required (a HF model directory, a GGUF file or a cached Hub id)"


def sft_loss(model, batch):
    sel = label_positions(batch["labels"])
    targets = batch["labels"][:, 1:][sel[:, :-1]]
    lp = logprobs_at(model, batch["input_ids"], batch["attention_mask"], sel, targets,
                     segment_ids=batch.get("segment_ids"))
    n = torch.tensor(targets.numel(), device=lp.device)
    return -lp.sum() / n.clamp(min=1), {"tokens": n}   # lm_loss_at's mean cross-entropy, no [N, V] kept


@stage_entry
def run(cfg: SFTConfig) -> dict:
    validate(cfg)  # everything, before the run directory is written
    train_path = require_file(cfg.data.train, "data.train")
    records = require_records(read_records(train_path, cfg.data.chat), train_path, "data.train")
    if cfg.data.eval:
        eval_records = require_records(read_records(require_file(cfg.data.eval, "data.eval"), cfg.data.chat),
                                       cfg.data.eval, "data.eval")
    else:
        records, eval_records = split_by_prompt(records, cfg.data.eval_fraction)
    eval_check = dict(file=cfg.data.eval, fraction=cfg.data.eval_fraction, train=str(train_path))
    has_eval = check_eval_split(len(eval_records), **eval_check)   # no eval data at all: log no eval
    st = start_stage(cfg, "sft", cfg.model.path)
    rt, tok, model = st.rt, st.tokenizer, st.model
    model.add_adapter("sft", cfg.adapter)
    model.add_role("sft", ["sft"])
    model.set_trainable(["sft"])
    model.activate("sft")

    examples, report = build_examples(records, tok, cfg.data.max_length, cfg.data.completion_only_loss,
                                      cfg.data.chat_template, where=str(train_path), turns=cfg.data.train_turns)
    eval_examples, _ = build_examples(eval_records, tok, cfg.data.max_length, cfg.data.completion_only_loss,
                                      cfg.data.chat_template, where="eval", turns=cfg.data.train_turns)
    if has_eval:
        check_eval_split(len(eval_examples), what="examples with a non-empty completion", **eval_check)
    if report.prompt_truncated or report.prompt_turns_dropped or report.completion_truncated or report.turns_dropped:
        rt.print(f"[sft] truncation (max_length={cfg.data.max_length}): {report.as_dict()}")
    train_set = pack(examples, cfg.data.max_length) if cfg.data.packing else examples
    collate = Collator(tok.pad_token_id, packed=cfg.data.packing)
    eval_prompts = [render(r, tok, cfg.data.chat_template)[0] for r in eval_records[:cfg.data.num_samples]]

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(eval_examples), cfg.train.batch_size):
            b = collate(eval_examples[i:i + cfg.train.batch_size])
            b = {k: v.to(rt.device) for k, v in b.items()}
            sel = label_positions(b["labels"])
            out = model(b["input_ids"], b["attention_mask"], role="sft", logits_at=sel)
            loss, n = lm_loss_at(out.logits, b["labels"], sel)
            total += float(loss) * int(n)
            count += int(n)
        sums = rt.mean_across({"sum": total, "n": count})  # identical on all ranks here
        eval_loss = sums["sum"] / max(sums["n"], 1)
        if eval_prompts:
            resp = generate(model, [encode(tok, p, bos=True) for p in eval_prompts], tok, rt.device, role="sft",
                            max_new_tokens=cfg.data.max_new_tokens, greedy=True, runtime=rt)
            rows = [{"prompt": p, "completion": c} for p, c in zip(eval_prompts, decode(tok, resp))]
            st.tracker.log_samples("sft/samples", rows, step)
        return {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))}

    trainer = Trainer("sft", st.run_dir, cfg.train, rt, model, train_set, collate, sft_loss,
                      st.tracker, eval_fn=evaluate if has_eval else None, dtype=cfg.model.dtype)
    result = trainer.run(resume=cfg.resume)
    if "stopped_at" in result:
        st.tracker.finish()
        return result
    with rt.gathered(model.adapters["sft"].parameters()):
        if rt.is_main:
            save_adapter(model, "sft", RunDir(st.run_dir).adapter("sft"), backbone_name=st.backbone_path)
    summary = {"stage": "sft", **result, "train_examples": len(examples), "eval_examples": len(eval_examples),
               "truncation": report.as_dict(), "trainable_params": model.adapters["sft"].num_params(),
               "backbone_params": model.backbone_num_params()}
    return finish_stage(st, summary, "sft")
