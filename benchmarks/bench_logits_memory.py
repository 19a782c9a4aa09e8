"""Peak memory and time of one PPO step on SmolLM2-135M-Instruct (49,152-token vocabulary) with
logits computed only where they are used (align today) and over every position (align before
issue 15's fix 6), each mode in its own process.

    python benchmarks/bench_logits_memory.py --reps 2 --threads 2

"before" is the current code with ``AlignModel.forward`` wrapped to compute the LM head at every
position and slice afterwards, which is what the code did before: the prefill of generation, the
rollout's scoring of policy/reference and the update's policy forward all made [B, T, V] logits.
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


CONTEXT = ("The museum opened in the spring after years of work by volunteers who restored the old mill by "
           "the river. Its halls hold tools, letters, maps and photographs from the families who lived in the "
           "valley, and a small workshop where visitors can watch a weaver at her loom. The guides explain how "
           "water turned the great wheel, how grain was stored through the winter, and how the village grew "
           "around the mill until the railway came. Children like the room of toys carved from wood, and most "
           "visitors end their tour in the garden, where herbs grow in the same beds the miller planted. ") * 4


def full_logits_forward():
    """Wrap AlignModel.forward so logits come from every position, then the asked ones are kept."""
    from align.model import AlignModel
    orig = AlignModel.forward

    def cut(o, at):
        if o.logits is not None and at is not None:
            o.logits = o.logits[at] if hasattr(at, "dtype") else o.logits[:, at]
        return o

    def forward(self, *args, logits_at=None, **kw):
        out = orig(self, *args, **kw)
        if isinstance(out, dict):
            return {k: cut(v, logits_at) for k, v in out.items()}
        return cut(out, logits_at)
    AlignModel.forward = forward


def worker(a) -> dict:
    import torch

    import align.stages.ppo as ppo
    from align.config import load_config
    if a.mode == "before":
        full_logits_forward()
    work = Path(a.workdir)
    prompts = work / "prompts.jsonl"
    context = " ".join(CONTEXT.split()[:a.context_words])
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": (context + "\n\n" if context else "")
                                                       + q}]}) + "\n" for q in QUESTIONS * 8))
    cfg = load_config(ppo.PPOConfig, None, [
        f"output_dir={work / a.run_name}", f"sft_run={work / 'sft'}", f"reward_run={work / 'rm'}",
        f"data.prompts={prompts}", f"data.eval_prompts={prompts}", f"ppo.iterations={a.warmup + a.steps}",
        f"ppo.rollout_batch_size={a.batch}", f"ppo.micro_batch_size={a.micro_batch}", "ppo.num_minibatches=1",
        "ppo.num_ppo_epochs=1", f"ppo.response_length={a.response_length}", "ppo.temperature=1.0",
        "ppo.missing_stop_mode=none", "eval.num_prompts=1", "tracking.wandb=false"])
    ppo.run(cfg)
    rows = [json.loads(x) for x in (work / a.run_name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    from align.backbone import load_tokenizer
    from align.data.common import read_records
    from align.data.sft import encode_prompts
    tok = load_tokenizer(json.loads((work / "sft" / "backbone.json").read_text())["path"])
    lens = [len(p["ids"]) for p in encode_prompts(read_records(prompts), "prompts", tok)]
    return {"step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
            "prompt_tokens": round(statistics.mean(lens)),
            "peak_mb": peak_memory_mb("cpu"), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--context-words", type=int, default=0,
                    help="words of context before each question (long prompts: where logits of every prompt "
                         "position cost most)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="after", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--run-name", help=argparse.SUPPRESS)
    a = ap.parse_args()
    set_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    model, work = smollm2_stage_runs("logits_memory")
    load0 = load_average("start")
    common = ["--workdir", str(work), "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
              "--response-length", str(a.response_length), "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--threads", str(a.threads), "--context-words", str(a.context_words)]
    runs = {"before": [], "after": []}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rep in range(a.reps):  # modes alternate, each in a fresh process
        for mode in ("before", "after"):
            t = time.time()
            runs[mode].append(run_worker(sys.executable, Path(__file__), [
                *common, "--mode", mode, "--run-name", f"ppo_{stamp}_{mode}_{rep}"]))
            print(f"{mode}: {runs[mode][-1]} ({time.time() - t:.0f} s)", flush=True)
    prompt_tokens = runs["after"][0]["prompt_tokens"]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mb")} for m, rs in runs.items()}
    title = (f"PPO step on SmolLM2-135M-Instruct (vocab 49,152), cpu, rollout {a.batch}, micro-batch "
             f"{a.micro_batch}, prompts of ~{prompt_tokens} tokens, {a.response_length} new tokens, LoRA r8 q/v; "
             f"median of {a.reps} process(es) per mode")
    md = [f"#### {title}", "", "| metric | logits everywhere (before) | logits where used (after) | after / before |",
          "|---|---|---|---|"]
    for k, label in (("peak_mb", "peak RSS (MiB)"), ("step_s", "step time (s)")):
        b, f = med["before"][k], med["after"][k]
        md.append(f"| {label} | {b:,.0f} | {f:,.0f} | {f / b:.2f} |" if k == "peak_mb" else
                  f"| {label} | {b:.2f} | {f:.2f} | {f / b:.2f} |")
    md += ["", f"Machine: {machine()}; load average at start {load0}."]
    markdown = "\n".join(md) + "\n"
    print(markdown)
    write_results(f"logits_memory_smollm2_cpu_ctx{a.context_words}", {"runs": runs, "medians": med, "args": vars(a)}, markdown,
                  Path(a.out))


if __name__ == "__main__":
    main()
