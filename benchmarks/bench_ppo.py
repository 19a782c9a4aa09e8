"""PPO step (rollout + update) of align against TRL's last PPO trainer, side by side.

    python benchmarks/bench_ppo.py --size 100m --reps 3            # both sides, CPU
    python benchmarks/bench_ppo.py --size 1b --device cuda --side align

Same on both sides: the random-init Llama of ``--size``, the prompts, the rollout batch, response
length (no early stop: a random model almost never samples EOS, and both sides count the tokens
they generate), PPO epochs and minibatches, a LoRA of rank 8 on q_proj/v_proj for the policy,
temperature 1. TRL (``trl.experimental.ppo.PPOTrainer`` from trl 1.12.0, run from its own virtual
environment) holds what its design holds: the policy with peft LoRA (reference = adapters
disabled), and a separate full value model and reward model (``AutoModelForSequenceClassification``).
align holds one backbone with four roles: policy and reference (LoRA), value (LoRA + head,
initialised from the reward role), reward (LoRA + head).

Batching is matched as trl 1.12 allows (see ``trl_batch_args``): align samples the whole rollout
batch in one KV-cache call, so TRL's ``local_rollout_forward_batch_size`` (its generation chunk, also
its chunk for the no-grad scoring forwards) is the whole batch too; the update runs in chunks of
``--micro-batch`` rows on both sides with one optimizer step per minibatch.

A step's time is the median over the timed iterations (after ``--warmup``) within one process;
each side runs ``--reps`` processes and the table shows the median over them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import side_by_side_arguments  # noqa: E402

PROMPTS = [f"Review of the {a} {b}:" for a in ("quiet", "bright", "old", "new", "small", "grand", "dark", "calm")
           for b in ("harbor", "bistro", "film", "hotel", "garden", "river", "song", "story")]


def trl_batch_args(batch: int, minibatches: int, micro_batch: int) -> tuple[int, int]:
    """(per_device_train_batch_size, gradient_accumulation_steps) that make trl 1.12's PPOTrainer run
    what align runs: a rollout of ``batch`` prompts, ``minibatches`` optimizer steps per epoch, each
    over forward/backward chunks of ``micro_batch`` rows.

    In trl 1.12 the rollout batch is per_device_train_batch_size x gradient_accumulation_steps (per
    process), a minibatch is that / num_mini_batches, the forward/backward chunk is
    per_device_train_batch_size, and the optimizer steps once every gradient_accumulation_steps
    chunks (accelerate's counter runs across minibatches). So with one minibatch the match is
    (micro_batch, batch / micro_batch); with several, each minibatch must be a single chunk
    (micro_batch = batch / minibatches) and the pair is (batch, 1): the chunk loop then takes the
    whole minibatch in one forward. Other combinations cannot be expressed in trl 1.12."""
    if batch % micro_batch:
        raise SystemExit(f"--batch {batch} must be a multiple of --micro-batch {micro_batch}")
    if minibatches == 1:
        return micro_batch, batch // micro_batch
    if batch % minibatches or micro_batch != batch // minibatches:
        raise SystemExit(f"with --minibatches {minibatches} > 1, trl 1.12's PPOTrainer steps the optimizer once per "
                         f"gradient_accumulation_steps chunks across minibatches: set --micro-batch "
                         f"{batch // max(1, minibatches)} (= batch / minibatches) so both sides match")
    return batch, 1


# ----------------------------------------------------------------------------- workers
def align_worker(a) -> dict:
    import statistics

    import torch

    import align.stages.ppo as ppo
    from align.config import load_config
    from benchmarks.common import peak_memory_mb
    work = Path(a.workdir)
    sft, rm = work / "sft", work / "rm"  # made by the parent (prepare_stage_runs)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 8))
    n_it = a.warmup + a.steps
    cfg = load_config(ppo.PPOConfig, None, [
        f"output_dir={work / 'ppo'}", f"sft_run={sft}", f"reward_run={rm}",
        f"data.prompts={prompts}", f"data.eval_prompts={prompts}", f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
        f"ppo.iterations={n_it}", f"ppo.rollout_batch_size={a.batch}", f"ppo.micro_batch_size={a.micro_batch}",
        f"ppo.num_minibatches={a.minibatches}", f"ppo.num_ppo_epochs={a.epochs}", f"ppo.response_length={a.response_length}",
        "ppo.temperature=1.0", "ppo.missing_stop_mode=none", "eval.num_prompts=1", "tracking.wandb=false",
        f"model.gradient_checkpointing={str(a.gradient_checkpointing == 'on').lower()}", *a.align_set])
    summary = ppo.run(cfg)
    rows = [json.loads(x) for x in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    step = [r["time/rollout_s"] + r["time/update_s"] for r in rows]
    gen = [r["throughput/generated_tokens_per_s"] for r in rows]  # tokens / generation seconds
    trainable = summary["trainable_params"]
    return {"step_s": statistics.median(step), "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
            "update_s": statistics.median(r["time/update_s"] for r in rows), "gen_tokens_per_s": statistics.median(gen),
            "generate_s": statistics.median(r["time/generate_s"] for r in rows),
            "peak_mb": peak_memory_mb(a.device), "trainable_policy": trainable["policy"],
            "trainable_total": trainable["policy"] + trainable["value"], "backbone_params": summary["backbone_params"],
            "response_tokens": statistics.median(r["response/length"] for r in rows),
            "torch_threads": torch.get_num_threads()}


def trl_worker(a) -> dict:
    import statistics

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype)
    for mdl in (value, reward):
        mdl.config.pad_token_id = tok.pad_token_id
    n_it = a.warmup + a.steps
    ds = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False).input_ids for p in (PROMPTS * 8)]})
    per_device, accum = trl_batch_args(a.batch, a.minibatches, a.micro_batch)
    args = PPOConfig(output_dir=str(Path(a.workdir) / "trl"), per_device_train_batch_size=per_device,
                     gradient_accumulation_steps=accum, num_mini_batches=a.minibatches, num_ppo_epochs=a.epochs,
                     total_episodes=a.batch * n_it, response_length=a.response_length, temperature=1.0,
                     local_rollout_forward_batch_size=a.batch, stop_token=None, missing_eos_penalty=None,
                     learning_rate=1e-5, report_to=[], num_sample_generations=0, save_strategy="no",
                     logging_steps=1, seed=0, bf16=a.device == "cuda", use_cpu=a.device == "cpu",
                     kl_coef=0.05, dataloader_num_workers=0,
                     gradient_checkpointing=a.gradient_checkpointing == "on")
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=ds, value_model=value,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)][a.warmup:]
    pol = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
    trainable_policy = sum(p.numel() for p in pol.parameters() if p.requires_grad)
    trainable_total = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for n, p in pol.named_parameters() if "lora" not in n)
    gen_tokens = a.batch * a.response_length  # TRL generates the full length without a stop token
    from benchmarks.common import peak_memory_mb
    step = statistics.median(times)
    return {"step_s": step, "peak_mb": peak_memory_mb(a.device), "trainable_policy": trainable_policy,
            "trainable_total": trainable_total, "backbone_params": backbone,
            "steps_timed": len(times), "gen_tokens_per_step": gen_tokens, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- parent
def parse_arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side_by_side_arguments(ap, reps=3, warmup=1, steps=3)
    ap.add_argument("--batch", type=int, default=16, help="rollout batch (prompts per PPO step)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--gradient-checkpointing", default="off", choices=["on", "off"],
                    help="both sides (TRL's PPOConfig flag; align's model.gradient_checkpointing)")
    ap.add_argument("--align-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for align's PPO config only (repeatable), e.g. value.share_policy=true")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--method", default="ppo", help=argparse.SUPPRESS)       # memory_phases.py's
    ap.add_argument("--interval", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker_arguments(a, model: Path) -> list[str]:
    """The arguments every worker process gets, both sides."""
    return ["--model", str(model), "--device", a.device, "--warmup", str(a.warmup), "--steps", str(a.steps),
            "--batch", str(a.batch), "--micro-batch", str(a.micro_batch), "--minibatches", str(a.minibatches),
            "--epochs", str(a.epochs), "--response-length", str(a.response_length),
            "--gradient-checkpointing", a.gradient_checkpointing] + [x for s in a.align_set for x in ("--align-set", s)]


def main(argv=None):
    a = parse_arguments(argv)
    if a.worker:
        print(json.dumps((align_worker if a.which == "align" else trl_worker)(a)))
        return
    from benchmarks.common import (backbone_params, load_average, machine, model_dir, prepare_stage_runs, run_sides,
                                   set_threads, table, write_results)
    threads = set_threads(a.threads)
    load_start = load_average("start")
    if a.side != "align":
        trl_batch_args(a.batch, a.minibatches, a.micro_batch)  # fails early on settings TRL cannot match
    model = model_dir(a.size)
    common = worker_arguments(a, model)
    results = run_sides(a, "ppo", Path(__file__), common, lambda wd: prepare_stage_runs(model, wd))
    al = results.get("align", {}).get("median", {})
    tr = results.get("trl", {}).get("median")
    if tr:  # TRL generates the full length (no stop token); it logs no separate rollout time
        tr["tokens_per_step_s"] = tr["gen_tokens_per_step"] / tr["step_s"]
    if al:
        al["tokens_per_step_s"] = a.batch * al["response_tokens"] / al["step_s"]
    n_backbone = backbone_params(model)  # the checkpoint's own count, the same denominator on both sides
    for r in (al, tr):
        if r:
            r["trainable_fraction_pct"] = 100 * r["trainable_policy"] / n_backbone
    mem = "peak allocated GPU memory (MiB)" if a.device == "cuda" else "peak resident memory (MiB)"
    n_params = n_backbone
    md = table(f"PPO step, {a.size} Llama ({n_params:,} params), "
               f"{a.device}, batch {a.batch}, {a.response_length} new tokens, {a.epochs} epoch(s) x "
               f"{a.minibatches} minibatch(es), micro-batch {a.micro_batch}, LoRA r8 q/v, gradient checkpointing "
               f"{a.gradient_checkpointing}, {threads}; median of {a.reps} processes",
               [("step_s", "seconds per PPO step (rollout + update)"), ("peak_mb", mem),
                ("tokens_per_step_s", "generated tokens per second of PPO step"),
                ("trainable_policy", "trainable parameters, policy"),
                ("trainable_total", "trainable parameters, all roles"),
                ("trainable_fraction_pct", "policy trainable / backbone (%)")], al, tr, {})
    if al:
        md += (f"\nalign's step splits into rollout {al['rollout_s']:.3g} s (generation {al['generate_s']:.3g} s at "
               f"{al['gen_tokens_per_s']:,.0f} tokens/s, then the no-grad scoring forwards of reference, value and "
               f"reward; the policy's old log-probs are the sampler's) and update {al['update_s']:.3g} s.\n")
    payload = {"benchmark": "ppo", "size": a.size, "device": a.device, "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "args": vars(a),
               "load_average": {"start": load_start, "end": load_average("end")}, "results": results}
    if a.align_set:
        md += f"\n\nalign's settings beyond the defaults: {', '.join(a.align_set)}\n"
    write_results(f"ppo_{a.size}_{a.device}_mb{a.micro_batch}_gc{a.gradient_checkpointing}" +
                  (f"_{a.tag}" if a.tag else ""), payload, md, Path(a.out))


if __name__ == "__main__":
    main()
