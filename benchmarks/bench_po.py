"""Preference / critic-free policy optimisation: align's ``dpo``, ``grpo`` and ``rloo`` stages against
TRL 1.16's ``DPOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer``, side by side, both with a LoRA.

    python benchmarks/bench_po.py --size 100m --threads 1                 # all three methods, CPU
    python benchmarks/bench_po.py --size tiny --methods grpo --reps 1 --steps 2

Unlike bench_ppo.py (whose TRL side is trl 1.12, the last with a PPO trainer, in benchmarks/.venv-trl),
the TRL side here is the trl of the running interpreter (1.16 when this was written; the trainer arguments
below are 1.16's), unless ``--trl-python`` names another; each worker records its trl version.

Same on both sides, per method:

* the random-init Llama of ``--size`` (benchmarks/common.py), fp32 on CPU (bf16 on CUDA; TRL's
  ``bf16`` default, true, is turned off on CPU), ``--threads`` per process;
* a LoRA of rank 8, alpha 16, no dropout, on q_proj/v_proj: align's policy is a trainable copy of the
  (identity) SFT LoRA that ``fake_stage_runs`` writes, TRL's a fresh peft LoRA (B = 0, so also the
  identity at step 0); AdamW with the same learning rate, constant schedule, gradient clipping at 1,
  no weight decay; gradient checkpointing on both sides or off on both (``--gradient-checkpointing``;
  on is TRL 1.16's default for all three trainers); dropout off; no evaluation or saving in the timed
  steps; ``--warmup`` untimed then ``--steps`` timed optimizer steps per process.
* DPO: the same synthetic prompt/chosen/rejected records (``--words`` words each, well under
  ``--max-length``), ``--dpo-batch`` pairs per optimizer step (chosen and rejected in one forward on
  both sides), sigmoid loss, beta 0.1, and the reference log-probs precomputed once before training
  (align's default ``dpo.reference=precompute``; TRL's ``precompute_ref_log_probs=True``, in batches
  of the training batch size on both sides), so a step is one policy forward and backward.
* GRPO and RLOO: the prompts of bench_ppo.py; a rollout of ``--batch`` responses (``--batch /
  --group-size`` prompts, each sampled ``--group-size`` times: TRL's ``num_generations``), all
  sampled in one generation call (TRL's ``generation_batch_size`` = the rollout batch), at most
  ``--response-length`` new tokens (``max_completion_length``), temperature 1, no top-k/top-p,
  one optimizer step per rollout (align ``num_minibatches=1, num_epochs=1``; TRL ``num_iterations=1``,
  ``steps_per_generation`` = ``gradient_accumulation_steps``), the update in chunks of
  ``--micro-batch`` rows (TRL ``per_device_train_batch_size``, accumulated over ``--batch /
  --micro-batch`` chunks), the reference's no-grad scoring forward in chunks of the same size, clip
  0.2, beta = kl_coef (``--grpo-beta`` 0.04: align's GRPO default, k3 in the loss; ``--rloo-beta``
  0.05: both sides' RLOO default, k1 summed over the response, in the reward). GRPO: TRL
  ``loss_type="grpo"`` (per-response mean over its tokens, then mean over responses: align's
  ``loss_type=grpo``) and ``scale_rewards="group"``; ``--grpo-loss dapo`` (TRL ``loss_type="dapo",
  epsilon_high=0.28``; align ``loss_type=dapo, cliprange_high=0.28``) or ``gspo`` (that, plus TRL
  ``importance_sampling_level="sequence"``; align ``ratio_level=sequence``) changes the loss on both sides.
  RLOO: leave-one-out baseline, no advantage normalisation. The reward is the Python callable
  ``length_reward`` below (characters of the completion / 100) on both sides: align's
  ``reward_fn=benchmarks.bench_po:length_reward`` (no normalisation: with a programmatic reward
  align's statistics are mean 0, std 1; its missing-stop penalty off, as TRL has none), TRL's
  ``reward_funcs=[length_reward]``. No vLLM, no continuous batching (TRL's defaults), transformers
  ``generate`` with a KV cache.

What differs and could not be removed (each side does what its design does):

* The reference. align's reference is the frozen SFT adapters on the backbone (a LoRA in the
  reference forward; the policy starts as their copy); TRL's, with a peft model and no ``ref_model``,
  is the base model with the adapters disabled. Both are the same function here (identity LoRA),
  and the extra rank-8 matmuls on q/v in align's reference forward are a fraction of a percent.
* Old log-probs (GRPO, RLOO). In float32 align takes the sampler's own log-probs
  (``rollout_logprobs=auto``); TRL's GRPO with one iteration per rollout also needs none
  (ratio = 1, ``per_token_logps.detach()``), but TRL's RLOO always runs one more no-grad policy
  forward over the rollout to get them. In bf16 (CUDA) align recomputes them as well.
* Entropy. TRL's GRPO and RLOO compute the full-vocabulary entropy of every completion token in the
  training forward (for logging); align's GRPO/RLOO update does not.
* Loss details that cost about the same: TRL's RLOO clips a sequence-level ratio (summed log-probs)
  and averages over sequences; align's RLOO clips per token and averages over tokens. TRL's GRPO adds
  1e-4 to the group std, align 1e-6.
* Timing. align's GRPO/RLOO step is ``time/rollout_s + time/update_s`` from its metrics (generation,
  reward, scoring forwards, update: as bench_ppo.py; the advantage arithmetic and logging between
  them, milliseconds, are not in it); align's DPO step is the wall time between consecutive logged
  steps (train_bench.py). TRL's step is the wall time between ``on_step_end`` callbacks (everything,
  its per-step logging included).
* Tokens. Each side tokenizes with its own code; with this tokenizer (no BOS) a prompt gets the same
  ids on both, and both end a DPO completion with EOS. A random model rarely samples EOS, so GRPO/RLOO
  responses run (nearly) the full length on both sides; the table gives the mean response length each
  side generated (on the tiny config's 512-token vocabulary EOS comes sooner than on 100m's).

A worker prints one JSON line; the parent runs ``--reps`` processes per side and method (the sides
alternating), takes medians and writes ``results/po_trl_<size>_<device>.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import side_by_side_arguments, table  # noqa: E402

METHODS = ("dpo", "grpo", "rloo")
LORA = dict(r=8, alpha=16, targets=["q_proj", "v_proj"])


def length_reward(prompts, completions, ended=None, **kwargs) -> list[float]:
    """The programmatic reward of both sides: a completion's length in characters / 100. align calls it
    as ``(prompts, responses, ended)``; TRL as ``(prompts=, completions=, completion_ids=, ...)``."""
    return [len(c) / 100.0 for c in completions]


REWARD_SPEC = "benchmarks.bench_po:length_reward"


def prompt_record(text: str, chat: bool) -> dict:
    """A prompts-file record both sides read: plain text, or (``--chat``) a one-turn conversation that
    each side renders with the tokenizer's chat template (align's ``prompt`` as a message list, TRL's
    conversational ``prompt``)."""
    return {"prompt": [{"role": "user", "content": text}] if chat else text}


def _prompts() -> list[str]:
    from benchmarks.bench_ppo import PROMPTS
    return list(PROMPTS)


# ----------------------------------------------------------------------------- workers
def align_worker(a) -> dict:
    import torch

    from align.config import load_config
    from benchmarks.common import peak_memory_mb
    work = Path(a.workdir)
    sft = work / "sft"  # made by the parent (prepare_stage_runs)
    n_steps = a.warmup + a.steps
    common = [f"output_dir={work / a.method}", f"sft_run={sft}", "tracking.wandb=false",
              f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
              f"model.gradient_checkpointing={str(a.gradient_checkpointing == 'on').lower()}"]
    if a.method == "dpo":
        import align.stages.dpo as stage
        from benchmarks.train_bench import records, step_times_from_metrics
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records("reward", a.dpo_batch * (n_steps + 2), a.words)))
        cfg = load_config(stage.DPOConfig, None, [
            *common, f"data.train={data}", "data.eval_fraction=0.0", f"data.max_length={a.max_length}",
            f"train.batch_size={a.dpo_batch}", f"train.max_steps={n_steps}", "train.log_every=1", f"train.lr={a.lr}",
            "train.scheduler=constant", "train.max_grad_norm=1.0", "dpo.beta=0.1", "dpo.loss=sigmoid",
            "dpo.reference=precompute", "eval.kl_prompts=0"])
        summary = stage.run(cfg)
        # one time per step after the first (the difference of consecutive logged steps): the first entry is
        # step 2's, so the steps after the warmup start at index warmup - 1
        times = step_times_from_metrics(work / a.method)[max(a.warmup - 1, 0):]
        return {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(a.device),
                "trainable": summary["trainable_params"], "steps_timed": len(times),
                "torch_threads": torch.get_num_threads()}
    import importlib
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(prompt_record(p, a.chat)) + "\n" for p in _prompts()))
    s = a.method
    stage = importlib.import_module(f"align.stages.{s}")
    cfg_cls, run = (stage.GRPOConfig if s == "grpo" else stage.RLOOConfig), stage.run
    extra = [*GRPO_LOSSES[a.grpo_loss]["align"], "grpo.kl_estimator=k3", f"grpo.kl_coef={a.grpo_beta}"] \
        if s == "grpo" else [f"rloo.kl_coef={a.rloo_beta}"]
    cfg = load_config(cfg_cls, None, [
        *common, f"reward_fn={REWARD_SPEC}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
        "eval.num_prompts=0", f"{s}.iterations={n_steps}", f"{s}.rollout_batch_size={a.batch}",
        f"{s}.group_size={a.group_size}", f"{s}.micro_batch_size={a.micro_batch}", f"{s}.num_minibatches=1",
        f"{s}.num_epochs=1", f"{s}.response_length={a.response_length}", f"{s}.temperature=1.0",
        f"{s}.lr={a.lr}", f"{s}.lr_schedule=constant", f"{s}.max_grad_norm=1.0", f"{s}.cliprange=0.2",
        f"{s}.missing_stop_mode=none", *extra, *a.align_set])
    summary = run(cfg)
    rows = [json.loads(x) for x in (work / s / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    return {"step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
            "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
            "generate_s": statistics.median(r["time/generate_s"] for r in rows),
            "update_s": statistics.median(r["time/update_s"] for r in rows),
            "response_tokens": statistics.median(r["response/length"] for r in rows),
            "peak_mb": peak_memory_mb(a.device), "trainable": summary["trainable_params"]["policy"],
            "steps_timed": len(rows), "torch_threads": torch.get_num_threads(),
            **({"loss": {k: getattr(cfg.grpo, k) for k in ("loss_type", "cliprange_high", "ratio_level")}}
               if s == "grpo" else {})}


def trl_worker(a) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from benchmarks.common import peak_memory_mb
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    n_steps = a.warmup + a.steps
    stamps: list[float] = []
    lengths: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    common = dict(output_dir=str(Path(a.workdir) / "trl"), max_steps=n_steps, learning_rate=a.lr,
                  lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[],
                  save_strategy="no", eval_strategy="no", seed=0, bf16=a.device == "cuda", use_cpu=a.device == "cpu",
                  dataloader_num_workers=0, disable_dropout=True,
                  gradient_checkpointing=a.gradient_checkpointing == "on")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")
    if a.method == "dpo":
        from trl import DPOConfig, DPOTrainer
        from benchmarks.train_bench import records
        ds = Dataset.from_list(records("reward", a.dpo_batch * (n_steps + 2), a.words))
        args = DPOConfig(per_device_train_batch_size=a.dpo_batch, max_length=a.max_length, beta=0.1,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True, adam_epsilon=1e-8, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                             callbacks=[Stamp()])
    else:
        ds = Dataset.from_list([prompt_record(p, a.chat) for p in _prompts()])
        group = dict(per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=a.batch // a.micro_batch,
                     generation_batch_size=a.batch, num_generations=a.group_size, num_iterations=1,
                     max_completion_length=a.response_length, temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2,
                     use_vllm=False, log_completions=False, adam_epsilon=1e-5, **common)
        if a.method == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer
            args = Config(beta=a.grpo_beta, scale_rewards="group", **GRPO_LOSSES[a.grpo_loss]["trl"], **group)
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer
            args = Config(beta=a.rloo_beta, normalize_advantages=False, **group)
        assert args.steps_per_generation == args.gradient_accumulation_steps  # one rollout per optimizer step
        trainer = Trainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=ds, processing_class=tok,
                          peft_config=lora, callbacks=[Stamp()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    trainer.train()
    times = [b - x for x, b in zip([t0] + stamps[:-1], stamps)][a.warmup:]
    out = {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(a.device), "trainable": trainable,
           "steps_timed": len(times), "torch_threads": torch.get_num_threads(), "trl_version": trl.__version__,
           **({"loss": {k: getattr(args, k) for k in ("loss_type", "epsilon_high", "importance_sampling_level")}}
              if a.method == "grpo" else {})}
    if lengths:
        out["response_tokens"] = statistics.median(lengths[a.warmup:] or lengths)
    return out


# The GRPO loss variants --grpo-loss sets on both sides (the same objective under each side's names):
# grpo: per-response token mean, symmetric clip; dapo: every token of the batch weighs the same, clip-higher
# 0.28 (DAPO, Yu et al. 2025; TRL 1.16's default loss); gspo: DAPO's loss with one ratio per response,
# exp(mean token log-ratio), clipped per response (GSPO, Zheng et al. 2025; TRL importance_sampling_level).
GRPO_LOSSES = {
    "grpo": {"align": ["grpo.loss_type=grpo"], "trl": {"loss_type": "grpo"}},
    "dapo": {"align": ["grpo.loss_type=dapo", "grpo.cliprange_high=0.28"],
             "trl": {"loss_type": "dapo", "epsilon_high": 0.28}},
    "gspo": {"align": ["grpo.loss_type=dapo", "grpo.cliprange_high=0.28", "grpo.ratio_level=sequence"],
             "trl": {"loss_type": "dapo", "epsilon_high": 0.28, "importance_sampling_level": "sequence"}},
}


# ----------------------------------------------------------------------------- parent
def trl_versions_of(results: dict) -> list[str]:
    """The trl versions the TRL workers reported (one, unless --trl-python changed between runs)."""
    return sorted({r["trl_version"] for res in results.values() for r in res.get("trl", {}).get("runs", [])
                   if r.get("trl_version")})


def parse_arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side_by_side_arguments(ap, reps=3, warmup=1, steps=3)
    next(x for x in ap._actions if x.dest == "trl_python").help = \
        "a Python with trl 1.16 (default: this interpreter, not bench_ppo's benchmarks/.venv-trl)"
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # the worker's one
    ap.add_argument("--lr", type=float, default=1e-5, help="both sides, constant")
    ap.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"],
                    help="both sides (on: TRL 1.16's default for DPOConfig, GRPOConfig and RLOOConfig)")
    ap.add_argument("--dpo-batch", type=int, default=8, help="DPO: preference pairs per optimizer step")
    ap.add_argument("--words", type=int, default=60, help="DPO: words per record (prompt + completion)")
    ap.add_argument("--max-length", type=int, default=128, help="DPO: tokens per prompt + completion")
    ap.add_argument("--batch", type=int, default=16, help="GRPO/RLOO: responses per rollout (prompts x group size)")
    ap.add_argument("--group-size", type=int, default=4, help="GRPO/RLOO: responses per prompt")
    ap.add_argument("--micro-batch", type=int, default=16, help="GRPO/RLOO: rows per forward/backward chunk")
    ap.add_argument("--response-length", type=int, default=32, help="GRPO/RLOO: max new tokens")
    ap.add_argument("--grpo-beta", type=float, default=0.04, help="GRPO: KL coefficient (k3, in the loss)")
    ap.add_argument("--grpo-loss", default="grpo", choices=list(GRPO_LOSSES),
                    help="GRPO: the loss on both sides: grpo (per-response token mean), dapo (token-level over the "
                         "batch, clip-higher 0.28), gspo (dapo with a sequence-level ratio)")
    ap.add_argument("--rloo-beta", type=float, default=0.05, help="RLOO: KL coefficient (k1, in the reward)")
    ap.add_argument("--chat", action="store_true",
                    help="GRPO/RLOO: prompts as one-turn conversations, each side applying the tokenizer's chat "
                         "template (SmolLM2's adds its default system prompt)")
    ap.add_argument("--align-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for align's stage config only (repeatable), e.g. grpo.share_prompt=false, to "
                         "measure one lever against the same TRL run settings")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--interval", type=float, default=5.0, help=argparse.SUPPRESS)  # memory_phases.py's sampler
    return ap.parse_args(argv)


def checked_methods(a) -> list[str]:
    """The methods of ``--methods``, once they and the GRPO/RLOO batch sizes are valid."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if a.batch % a.group_size or a.batch % a.micro_batch:
        raise SystemExit(f"--batch {a.batch} must be a multiple of --group-size {a.group_size} and of "
                         f"--micro-batch {a.micro_batch} (TRL's generation batch holds whole groups and is cut into "
                         f"gradient_accumulation_steps chunks of per_device_train_batch_size)")
    return methods


def worker_arguments(a, model: Path) -> list[str]:
    """The arguments every worker process gets, both sides and every method."""
    return ["--model", str(model), "--device", a.device, "--warmup", str(a.warmup), "--steps", str(a.steps),
            "--lr", str(a.lr), "--gradient-checkpointing", a.gradient_checkpointing, "--dpo-batch", str(a.dpo_batch),
            "--words", str(a.words), "--max-length", str(a.max_length), "--batch", str(a.batch),
            "--group-size", str(a.group_size), "--micro-batch", str(a.micro_batch),
            "--response-length", str(a.response_length), "--grpo-beta", str(a.grpo_beta), "--grpo-loss", a.grpo_loss,
            "--rloo-beta", str(a.rloo_beta)] + (["--chat"] if a.chat else []) + \
        [x for s in a.align_set for x in ("--align-set", s)]


def add_ratios(res: dict, n_backbone: int) -> None:
    """Each side's trainable fraction of the backbone and, with both sides, the align / TRL ratios."""
    al, tr = res.get("align", {}).get("median", {}), res.get("trl", {}).get("median")
    for r in (al, tr):
        if r:
            r["trainable_fraction_pct"] = 100 * r["trainable"] / n_backbone
    if al and tr:
        res["ratio"] = {k: al[k] / tr[k] for k in ("step_s", "peak_mb") if tr.get(k)}


def method_table(a, m: str, res: dict, n_backbone: int, threads: str) -> str:
    """One method's table: its settings in the title, a row per metric, align's rollout/update split."""
    al, tr = res.get("align", {}).get("median", {}), res.get("trl", {}).get("median")
    mem = "peak allocated GPU memory (MiB)" if a.device == "cuda" else "peak resident memory (MiB)"
    rows = [("step_s", "seconds per optimizer step" + ("" if m == "dpo" else " (rollout + update)")),
            ("peak_mb", mem)]
    if m == "dpo":
        what = (f"DPO step, batch {a.dpo_batch} pairs, {a.words} words per record, max length {a.max_length}, "
                f"beta 0.1, reference log-probs precomputed")
    else:
        beta = a.grpo_beta if m == "grpo" else a.rloo_beta
        loss = f" ({a.grpo_loss} loss)" if m == "grpo" and a.grpo_loss != "grpo" else ""
        what = (f"{m.upper()}{loss} step, {a.batch} responses ({a.batch // a.group_size} prompts x {a.group_size}), "
                f"{a.response_length} new tokens, micro-batch {a.micro_batch}, beta {beta}")
        rows.append(("response_tokens", "mean response length (tokens)"))
    rows += [("trainable", "trainable parameters"), ("trainable_fraction_pct", "trainable / backbone (%)")]
    md = table(f"{what}, {a.size} Llama ({n_backbone:,} params), {a.device}, LoRA r8 q/v, gradient "
               f"checkpointing {a.gradient_checkpointing}, {threads}; median of {a.reps} processes",
               rows, al, tr, {})
    if al and m != "dpo":
        md += (f"\nalign's step splits into rollout {al['rollout_s']:.3g} s (generation "
               f"{al['generate_s']:.3g} s, then the reward and the reference's scoring forward) and update "
               f"{al['update_s']:.3g} s.\n")
    return md


def summary_table(a, both: list[str], results: dict, threads: str) -> str:
    """One row per method that ran on both sides: seconds per step and peak memory, each with its ratio."""
    unit = "GPU MiB" if a.device == "cuda" else "RSS MiB"
    head = [f"#### Per method: align against trl {', '.join(trl_versions_of(results))}, {a.size} Llama, "
            f"{a.device}, LoRA r8 q/v, gradient checkpointing {a.gradient_checkpointing}, {threads}; median of "
            f"{a.reps} processes (the tables below give each method's settings)", "",
            f"| method | align s/step | TRL s/step | align / TRL | align peak {unit} | TRL peak {unit} "
            f"| align / TRL |",
            "|---|---|---|---|---|---|---|"]
    for m in both:
        al, tr, q = results[m]["align"]["median"], results[m]["trl"]["median"], results[m]["ratio"]
        head.append(f"| {m.upper()} | {al['step_s']:.3g} | {tr['step_s']:.3g} | {q['step_s']:.2f} | "
                    f"{al['peak_mb']:,.0f} | {tr['peak_mb']:,.0f} | {q['peak_mb']:.2f} |")
    return "\n".join(head) + "\n"


def main(argv=None):
    a = parse_arguments(argv)
    if a.worker:
        print(json.dumps((align_worker if a.which == "align" else trl_worker)(a)))
        return
    methods = checked_methods(a)
    a.trl_python = a.trl_python or sys.executable  # TRL 1.16 of this interpreter, not bench_ppo's trl 1.12 venv
    from benchmarks.common import (backbone_params, load_average, machine, model_dir, prepare_stage_runs, run_sides,
                                   set_threads, write_results)
    threads = set_threads(a.threads)
    load_start = load_average("start")
    model = model_dir(a.size)
    n_backbone = backbone_params(model)
    common = worker_arguments(a, model)
    results, md = {}, []
    for m in methods:
        res = run_sides(a, f"po-{m}", Path(__file__), ["--method", m, *common],
                        lambda wd: prepare_stage_runs(model, wd))
        results[m] = res
        add_ratios(res, n_backbone)
        md.append(method_table(a, m, res, n_backbone, threads))
    both = [m for m in methods if "ratio" in results[m]]
    if both:  # the summary: one row per method
        md.insert(0, summary_table(a, both, results, threads))
    trl_versions = trl_versions_of(results)
    payload = {"benchmark": "po_trl", "size": a.size, "device": a.device, "machine": machine(),
               "trl_version": trl_versions, "date": time.strftime("%Y-%m-%d"), "args": vars(a),
               "load_average": {"start": load_start, "end": load_average("end")}, "results": results}
    name = f"po_trl_{a.size}_{a.device}" + ("" if a.gradient_checkpointing == "on" else "_gcoff") + \
        ("_chat" if a.chat else "") + ("" if a.grpo_loss == "grpo" else f"_{a.grpo_loss}") + \
        (f"_{a.tag}" if a.tag else "")
    if a.align_set:
        md.append(f"align's settings beyond the defaults: {', '.join(a.align_set)}\n")
    write_results(name, payload, "\n".join(md), Path(a.out))


if __name__ == "__main__":
    main()
