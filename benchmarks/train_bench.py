"""SFT and reward-model steps of align against TRL's SFTTrainer / RewardTrainer with a peft LoRA of
the same rank and targets (the body of bench_sft.py and bench_reward.py).

Same on both sides: the random-init Llama of ``--size``, the records (synthetic prompt/completion
pairs for SFT; prompt/chosen/rejected for the reward model), batch size, ``--max-length``, LoRA r8
on q_proj/v_proj, AdamW, fp32 on CPU (bf16 on CUDA), loss on completion tokens only for SFT, no
packing, no evaluation or saving inside the timed steps, gradient checkpointing on both sides or off
on both (``--gradient-checkpointing``; on is TRL's default). A step's time is the median over the
timed optimizer steps after ``--warmup``, within one process; the table shows the median over
``--reps`` processes per side.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import side_by_side_arguments  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while happy people sing good songs and sad clouds bring "
         "bad rain but great sun makes wonderful days for everyone review movie film story plot").split()


def records(task: str, n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    if task == "sft":
        return [{"prompt": text(words // 2), "completion": " " + text(words // 2)} for _ in range(n)]
    return [{"prompt": text(words // 2), "chosen": " " + text(words // 2), "rejected": " " + text(words // 2)}
            for _ in range(n)]


def step_times_from_metrics(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "seconds" in r and "loss" in r]
    return [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]


def align_worker(a) -> dict:
    from align.config import load_config
    from benchmarks.common import peak_memory_mb
    work = Path(a.workdir)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(a.task, a.batch * (a.warmup + a.steps + 2), a.words)))
    common = [f"data.train={data}", f"data.max_length={a.max_length}", "data.eval_fraction=0.0",
              f"train.batch_size={a.batch}", f"train.max_steps={a.warmup + a.steps}", "train.log_every=1",
              "train.lr=1e-4", "train.scheduler=constant", "tracking.wandb=false", "adapter.r=8", "adapter.alpha=16",
              "adapter.target_modules=[q_proj,v_proj]", f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
              f"model.gradient_checkpointing={str(a.gradient_checkpointing == 'on').lower()}"]
    if a.task == "sft":
        import align.stages.sft as stage
        cfg = load_config(stage.SFTConfig, None, [f"output_dir={work / 'run'}", f"model.path={a.model}",
                                                   "data.num_samples=0", *common])
    else:
        import align.stages.reward as stage
        sft = work / "sft"  # made by the parent (prepare_stage_runs)
        cfg = load_config(stage.RewardConfig, None, [f"output_dir={work / 'run'}", f"sft_run={sft}",
                                                      "normalize.source=none", *common])
    summary = stage.run(cfg)
    # the metrics give step 1's duration no start to measure from: their first difference is step 2's,
    # so skipping warmup - 1 of them skips steps 1..warmup, as the TRL side does
    times = step_times_from_metrics(work / "run")[max(a.warmup - 1, 0):]
    return {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(a.device),
            "trainable": summary["trainable_params"] if isinstance(summary["trainable_params"], int)
            else sum(summary["trainable_params"].values()), "backbone_params": summary["backbone_params"],
            "torch_threads": __import__("torch").get_num_threads()}


def trl_worker(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from benchmarks.common import peak_memory_mb
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = Dataset.from_list(records(a.task, a.batch * (a.warmup + a.steps + 2), a.words))
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    common = dict(output_dir=str(Path(a.workdir) / "trl"), per_device_train_batch_size=a.batch,
                  max_steps=a.warmup + a.steps, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1,
                  report_to=[], save_strategy="no", eval_strategy="no", seed=0, bf16=a.device == "cuda",
                  use_cpu=a.device == "cpu", dataloader_num_workers=0, max_length=a.max_length,
                  gradient_checkpointing=a.gradient_checkpointing == "on")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if a.task == "sft":
        from trl import SFTConfig, SFTTrainer
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
        trainer = SFTTrainer(model=model, args=SFTConfig(completion_only_loss=True, packing=False, **common),
                             train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **lora), callbacks=[Stamp()])
    else:
        from trl import RewardConfig, RewardTrainer
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=ds, processing_class=tok,
                                peft_config=LoraConfig(task_type="SEQ_CLS", **lora), callbacks=[Stamp()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora" not in n)
    t0 = time.perf_counter()
    trainer.train()
    times = [b - x for x, b in zip([t0] + stamps[:-1], stamps)][a.warmup:]
    return {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(a.device), "trainable": trainable,
            "backbone_params": backbone, "torch_threads": torch.get_num_threads()}


def main(task: str, argv=None):
    ap = argparse.ArgumentParser(description=f"{task} step: align vs TRL")
    side_by_side_arguments(ap, reps=3, warmup=2, steps=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--words", type=int, default=60, help="words per record (prompt + completion)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"],
                    help="on both sides (on: TRL's default for SFTConfig/RewardConfig)")
    a = ap.parse_args(argv)
    a.task = task
    if a.worker:
        print(json.dumps((align_worker if a.which == "align" else trl_worker)(a)))
        return
    from benchmarks.common import (backbone_params, load_average, machine, model_dir, prepare_stage_runs, run_sides,
                                   set_threads, table, write_results)
    threads = set_threads(a.threads)
    load_start = load_average("start")
    model = model_dir(a.size)
    script = Path(__file__).resolve().parent / f"bench_{task}.py"
    common = ["--model", str(model), "--device", a.device, "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--batch", str(a.batch), "--words", str(a.words), "--max-length", str(a.max_length),
              "--gradient-checkpointing", a.gradient_checkpointing]
    results = run_sides(a, task, script, common,
                        (lambda wd: prepare_stage_runs(model, wd)) if task == "reward" else None)
    al, tr = results.get("align", {}).get("median", {}), results.get("trl", {}).get("median")
    n_backbone = backbone_params(model)  # the checkpoint's own count: the same denominator on both sides (TRL's
    for r in (al, tr):                  # reward model has no LM head, and peft keeps two copies of its score head)
        if r:
            r["trainable_fraction_pct"] = 100 * r["trainable"] / n_backbone
    what = "SFT" if task == "sft" else "Reward-model"
    unit = "examples" if task == "sft" else "pairs"
    mem = "peak allocated GPU memory (MiB)" if a.device == "cuda" else "peak resident memory (MiB)"
    md = table(f"{what} step, {a.size} Llama, {a.device}, batch {a.batch} {unit}, max length {a.max_length}, "
               f"LoRA r8 q/v, gradient checkpointing {a.gradient_checkpointing}, {threads}; median of {a.reps} processes",
               [("step_s", "seconds per optimizer step"), ("peak_mb", mem), ("trainable", "trainable parameters"),
                ("trainable_fraction_pct", "trainable / backbone (%)")], al, tr, {})
    payload = {"benchmark": task, "size": a.size, "device": a.device, "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "args": vars(a),
               "load_average": {"start": load_start, "end": load_average("end")}, "results": results}
    write_results(f"{task}_{a.size}_{a.device}_gc{a.gradient_checkpointing}", payload, md, Path(a.out))
