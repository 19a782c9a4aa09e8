"""Peak memory and time of one PPO step on SmolLM2-135M-Instruct with the one frozen backbone in
float32, int8 and nf4 (``model.quantization``), each mode in its own process.

    python benchmarks/bench_quant_memory.py --reps 1 --threads 2

Policy, reference, value and reward are LoRA roles (r 8, q/v) on the one backbone in every mode;
the compute dtype is float32. Three figures per mode: the bytes of the backbone's weights as
loaded (parameters and buffers), the process's peak RSS over the measured PPO steps (sampled every
20 ms from /proc/self/status once the warm-up iterations are in metrics.jsonl) and over the whole
process (``ru_maxrss``: includes loading, where transformers quantizes from the float checkpoint).
RSS is the whole process's (Python, torch, tokenizer, activations included), so it shrinks by less
than the weights do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    HERE,
    load_average,
    machine,
    peak_memory_mb,
    run_worker,
    set_threads,
    smollm2_stage_runs,
    write_results,
)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
             "How many legs does a spider have?", "What do bees make?", "Who wrote Hamlet?",
             "What is the boiling point of water?", "Explain photosynthesis in one sentence."]
MODES = ("none", "int8", "nf4")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def steps_peak_sampler(metrics: Path, warmup: int):
    """A thread that records the peak RSS once ``warmup`` PPO iterations are logged."""
    import threading
    state = {"peak": 0.0, "armed": warmup == 0, "stop": False}

    def loop():
        while not state["stop"]:
            if not state["armed"] and metrics.exists():
                state["armed"] = sum("time/rollout_s" in ln for ln in metrics.read_text().splitlines()) >= warmup
            if state["armed"]:
                state["peak"] = max(state["peak"], rss_mb())
            time.sleep(0.02)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return state


def weights_mb(model: str, quantization: str) -> float:
    """Bytes of the loaded backbone's parameters and buffers (packed 4-bit weights as stored)."""
    from align.backbone import load_backbone, load_tokenizer
    m = load_backbone(model, tokenizer=load_tokenizer(model), quantization=quantization)
    n = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    for mod in m.modules():  # 4-bit block scales live in the quant state, not in a buffer
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            n += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values()
                     if hasattr(v, "element_size"))
        scb = getattr(getattr(mod, "weight", None), "SCB", None)
        if scb is not None and not any(scb is b for b in m.buffers()):
            n += scb.numel() * scb.element_size()
    return n / 2**20


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
    sampler = steps_peak_sampler(work / a.run_name / "metrics.jsonl", a.warmup)
    ppo.run(cfg)
    sampler["stop"] = True
    rows = [json.loads(x) for x in (work / a.run_name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    return {"step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
            "steps_peak_mb": sampler["peak"], "peak_mb": peak_memory_mb("cpu"),
            "torch_threads": torch.get_num_threads()}


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
    model, work = smollm2_stage_runs("quant_memory")
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
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "steps_peak_mb", "peak_mb")}
           for m, rs in runs.items()}
    weights = {m: weights_mb(str(model), m) for m in modes}
    title = (f"PPO step on SmolLM2-135M-Instruct, cpu, float32 compute, rollout {a.batch}, micro-batch "
             f"{a.micro_batch}, {a.response_length} new tokens, four LoRA r8 q/v roles on one backbone; "
             f"median of {a.reps} process(es) per mode")
    md = [f"#### {title}", "",
          "| model.quantization | backbone weights (MiB) | peak RSS, PPO steps (MiB) | peak RSS, whole process incl. load (MiB) | step time (s) |",
          "|---|---|---|---|---|"]
    for m in modes:
        md.append(f"| {m} | {weights[m]:,.0f} | {med[m]['steps_peak_mb']:,.0f} | {med[m]['peak_mb']:,.0f} | "
                  f"{med[m]['step_s']:.2f} |")
    md += ["", f"Machine: {machine()}; load average at start {load0}."]
    markdown = "\n".join(md) + "\n"
    print(markdown)
    write_results("quant_memory_smollm2_cpu", {"runs": runs, "medians": med, "weights_mb": weights, "args": vars(a)},
                  markdown, Path(a.out))


if __name__ == "__main__":
    main()
