"""Peak memory and time of one PPO step on SmolLM2-135M-Instruct with the one frozen backbone in
float32, int8 and nf4 (``model.quantization``), each mode in its own process.

    python benchmarks/bench_quant_memory.py --reps 1 --threads 2

Policy, reference, value and reward are LoRA roles (r 8, q/v) on the one backbone in every mode;
the compute dtype is float32. Peak RSS is the whole process's (Python, torch, tokenizer included),
so it shrinks by less than the weights do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (HERE, WORK, load_average, machine, peak_memory_mb, prepare_stage_runs,  # noqa: E402
                               run_worker, set_threads, write_results)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
             "How many legs does a spider have?", "What do bees make?", "Who wrote Hamlet?",
             "What is the boiling point of water?", "Explain photosynthesis in one sentence."]
MODES = ("none", "int8", "nf4")


def worker(a) -> dict:
    import torch

    import align.stages.ppo as ppo
    from align.config import load_config
    work = Path(a.workdir)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n"
                               for q in QUESTIONS * 8))
    cfg = load_config(ppo.PPOConfig, None, [
        f"output_dir={work / a.run_name}", f"sft_run={work / 'sft'}", f"reward_run={work / 'rm'}",
        f"data.prompts={prompts}", f"data.eval_prompts={prompts}", f"ppo.iterations={a.warmup + a.steps}",
        f"ppo.rollout_batch_size={a.batch}", f"ppo.micro_batch_size={a.micro_batch}", "ppo.num_minibatches=1",
        "ppo.num_ppo_epochs=1", f"ppo.response_length={a.response_length}", "ppo.temperature=1.0",
        "ppo.missing_stop_mode=none", "eval.num_prompts=1", "tracking.wandb=false",
        f"model.quantization={a.mode}"])
    ppo.run(cfg)
    rows = [json.loads(x) for x in (work / a.run_name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    return {"step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
            "peak_mb": peak_memory_mb("cpu"), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--run-name", help=argparse.SUPPRESS)
    a = ap.parse_args()
    set_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    from align.real import smollm2_dir
    model = smollm2_dir()
    work = WORK / "quant_memory"
    work.mkdir(parents=True, exist_ok=True)
    prepare_stage_runs(model, work)
    load0 = load_average("start")
    modes = [m for m in a.modes.split(",") if m]
    common = ["--workdir", str(work), "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
              "--response-length", str(a.response_length), "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--threads", str(a.threads)]
    runs = {m: [] for m in modes}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rep in range(a.reps):  # modes alternate, each in a fresh process
        for mode in modes:
            t = time.time()
            runs[mode].append(run_worker(sys.executable, Path(__file__), [
                *common, "--mode", mode, "--run-name", f"ppo_{stamp}_{mode}_{rep}"]))
            print(f"{mode}: {runs[mode][-1]} ({time.time() - t:.0f} s)", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mb")} for m, rs in runs.items()}
    title = (f"PPO step on SmolLM2-135M-Instruct, cpu, float32 compute, rollout {a.batch}, micro-batch "
             f"{a.micro_batch}, {a.response_length} new tokens, four LoRA r8 q/v roles on one backbone; "
             f"median of {a.reps} process(es) per mode")
    md = [f"#### {title}", "", "| model.quantization | peak RSS (MiB) | step time (s) | RSS / none |", "|---|---|---|---|"]
    ref = med.get("none", {}).get("peak_mb")
    for m in modes:
        ratio = f"{med[m]['peak_mb'] / ref:.2f}" if ref else "-"
        md.append(f"| {m} | {med[m]['peak_mb']:,.0f} | {med[m]['step_s']:.2f} | {ratio} |")
    md += ["", f"Machine: {machine()}; load average at start {load0}."]
    markdown = "\n".join(md) + "\n"
    print(markdown)
    write_results("quant_memory_smollm2_cpu", {"runs": runs, "medians": med, "args": vars(a)}, markdown, Path(a.out))


if __name__ == "__main__":
    main()
