"""Peak memory and time of one PPO step with the frozen backbone in float32, int8 and nf4
(``model.quantization``), each mode in its own process, beside TRL 1.12's PPOTrainer loading its
models with the same bitsandbytes settings.

    python benchmarks/bench_quant_memory.py --size smollm2 --reps 1 --threads 2
    python benchmarks/bench_quant_memory.py --size 100m --sides align,trl --reps 1

align: policy, reference, value and reward are LoRA roles (r 8, q/v) on the one backbone in every
mode; the compute dtype is float32. TRL (``trl.experimental.ppo``, from benchmarks/.venv-trl with
bitsandbytes added) holds what its PPOTrainer allows in each mode: the policy loaded quantized with a
peft LoRA of the same shape (reference = adapters disabled), the reward model
(``AutoModelForSequenceClassification``) loaded quantized, and the value model in float32, since
TRL 1.12 trains the whole value model and quantized weights cannot be trained. (TRL's own
``examples/scripts/ppo/ppo.py`` builds a quantization config from ``--load_in_4bit`` but passes it
to none of its models; this benchmark gives TRL the most quantization its trainer can take.)

Figures per mode: the bytes of the weights as loaded (parameters and buffers, 4-bit block scales
included; TRL: its three models, LoRA excluded), the process's peak RSS over the measured PPO steps
(sampled every 20 ms from /proc/self/status once the warm-up iterations are done) and over the
whole process (``ru_maxrss``: includes loading, where transformers quantizes from the float
checkpoint). RSS is the whole process's (Python, torch, tokenizer, activations included), so it
shrinks by less than the weights do.
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
    WORK,
    load_average,
    machine,
    model_dir,
    peak_memory_mb,
    prepare_stage_runs,
    run_worker,
    set_threads,
    trl_python,
    write_results,
)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
             "How many legs does a spider have?", "What do bees make?", "Who wrote Hamlet?",
             "What is the boiling point of water?", "Explain photosynthesis in one sentence."]
MODES = ("none", "int8", "nf4")
# Allocations above 128 KiB straight from mmap, so memory freed is returned to the system and RSS
# follows the tensors alive (glibc otherwise raises its mmap threshold after the first large frees
# and keeps freed buffers in its heap: measured on the 100m Llama, float32 PPO peaked at 1,528 MiB
# without this and 1,236 MiB with it).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
SIZES = ("smollm2", "100m", "1b", "tiny")


def rss_mb(field: str = "VmRSS") -> float:
    """A /proc/self/status memory field in MiB: VmRSS (all resident pages), RssAnon (the process's
    own memory) or RssFile (pages of mapped files, e.g. a checkpoint read through a memory map:
    clean page cache the kernel can drop and read again)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def steps_peak_sampler(armed, field: str = "VmRSS"):
    """A thread that records the peak of ``field`` (rss_mb) every 20 ms once ``armed()`` is true."""
    import threading
    state = {"peak": 0.0, "stop": False}

    def loop():
        on = False
        while not state["stop"]:
            on = on or armed()
            if on:
                state["peak"] = max(state["peak"], rss_mb(field))
            time.sleep(0.02)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return state


def anon_peak_sampler():
    """The peak anonymous RSS from now on, load included. A quantized load reads the float
    checkpoint through a memory map, so VmRSS peaks near the checkpoint's size while loading even
    when the process's own memory stays small; RssAnon separates the two. (Sampled: a spike
    shorter than 20 ms can be missed; VmHWM, the peak_mb column, cannot.)"""
    return steps_peak_sampler(lambda: True, "RssAnon")


def tensors_mb(model) -> float:
    """Bytes of a loaded model's parameters and buffers, packed 4-bit weights as stored and their
    block scales (which live in the quant state, not in a buffer) and int8 row scales included;
    LoRA tensors are left out."""
    n = sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if "lora_" not in name)
    buffers = list(model.buffers())
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            n += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values()
                     if hasattr(v, "element_size"))
        scb = getattr(w, "SCB", None)
        if scb is not None and not any(scb is b for b in buffers):
            n += scb.numel() * scb.element_size()
    return n / 2**20


def weights_mb(model: str, quantization: str) -> float:
    """align's backbone as a stage loads it (one copy for all four roles)."""
    from align.backbone import load_backbone, load_tokenizer
    return tensors_mb(load_backbone(model, tokenizer=load_tokenizer(model), quantization=quantization))


def prompts_for(size: str) -> list:
    """Chat questions for SmolLM2 (an instruct model), plain text for the random-init Llamas."""
    if size == "smollm2":
        return [[{"role": "user", "content": q}] for q in QUESTIONS]
    return QUESTIONS


def align_worker(a) -> dict:
    anon = anon_peak_sampler()
    import torch

    import align.stages.ppo as ppo
    from align.config import load_config
    work = Path(a.workdir)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts_for(a.size) * 8))
    cfg = load_config(ppo.PPOConfig, None, [
        f"output_dir={work / 'ppo'}", f"sft_run={work / 'sft'}", f"reward_run={work / 'rm'}",
        f"data.prompts={prompts}", f"data.eval_prompts={prompts}", f"ppo.iterations={a.warmup + a.steps}",
        f"ppo.rollout_batch_size={a.batch}", f"ppo.micro_batch_size={a.micro_batch}", "ppo.num_minibatches=1",
        "ppo.num_ppo_epochs=1", f"ppo.response_length={a.response_length}", "ppo.temperature=1.0",
        "ppo.missing_stop_mode=none", "eval.num_prompts=1", "tracking.wandb=false",
        f"model.quantization={a.mode}"])
    metrics = work / "ppo" / "metrics.jsonl"

    def warmed_up() -> bool:
        return metrics.exists() and sum("time/rollout_s" in ln for ln in metrics.read_text().splitlines()) >= a.warmup
    sampler = steps_peak_sampler(warmed_up)
    ppo.run(cfg)
    sampler["stop"] = anon["stop"] = True
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if "time/rollout_s" in r][a.warmup:]
    return {"step_s": statistics.median(r["time/rollout_s"] + r["time/update_s"] for r in rows),
            "steps_peak_mb": sampler["peak"], "peak_mb": peak_memory_mb("cpu"), "anon_peak_mb": anon["peak"],
            "response_tokens": statistics.median(r["response/length"] for r in rows),
            "torch_threads": torch.get_num_threads()}


def trl_worker(a) -> dict:
    """TRL 1.12's PPOTrainer with as much of the one configuration quantized as it can train."""
    anon = anon_peak_sampler()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.bench_ppo import trl_batch_args
    torch.manual_seed(0)
    quant = {"none": None, "int8": BitsAndBytesConfig(load_in_8bit=True),
             "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)}[a.mode]
    frozen = dict(dtype=torch.float32, **({"quantization_config": quant, "device_map": "cpu"} if quant else {}))
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(a.model, **frozen)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, **frozen)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    for mdl in (value, reward):
        mdl.config.pad_token_id = tok.pad_token_id
    weights = sum(tensors_mb(m) for m in (policy, reward, value))
    prompts = prompts_for(a.size) * 8
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           if isinstance(p, list) else tok(p, add_special_tokens=False).input_ids for p in prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    n_it = a.warmup + a.steps
    per_device, accum = trl_batch_args(a.batch, 1, a.micro_batch)
    args = PPOConfig(output_dir=str(Path(a.workdir) / "trl"), per_device_train_batch_size=per_device,
                     gradient_accumulation_steps=accum, num_mini_batches=1, num_ppo_epochs=1,
                     total_episodes=a.batch * n_it, response_length=a.response_length, temperature=1.0,
                     local_rollout_forward_batch_size=a.batch, stop_token=None, missing_eos_penalty=None,
                     learning_rate=1e-5, report_to=[], num_sample_generations=0, save_strategy="no",
                     logging_steps=1, seed=0, use_cpu=True, bf16=False, kl_coef=0.05, dataloader_num_workers=0)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())
    sampler = steps_peak_sampler(lambda: len(stamps) >= a.warmup)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": ids}), value_model=value,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    sampler["stop"] = anon["stop"] = True
    times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)][a.warmup:]
    return {"step_s": statistics.median(times), "steps_peak_mb": sampler["peak"], "peak_mb": peak_memory_mb("cpu"),
            "anon_peak_mb": anon["peak"], "weights_mb": weights, "response_tokens": a.response_length,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="smollm2", choices=SIZES)
    ap.add_argument("--sides", default="align", help="align, trl or align,trl")
    ap.add_argument("--trl-python", default=None, help="a Python with trl 1.12 and bitsandbytes "
                    "(default: benchmarks/.venv-trl, bitsandbytes added to it on first use)")
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
    ap.add_argument("--which", default="align", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    set_threads(a.threads)
    if a.worker:
        print(json.dumps((align_worker if a.which == "align" else trl_worker)(a)))
        return
    model = model_dir(a.size)
    sides = [x for x in a.sides.split(",") if x]
    if unknown := set(sides) - {"align", "trl"}:
        raise SystemExit(f"--sides: unknown {sorted(unknown)}; use align, trl or align,trl")
    pythons = {"align": sys.executable}
    if "trl" in sides:
        pythons["trl"] = with_bitsandbytes(trl_python(a.trl_python))
    load0 = load_average("start")
    modes = [m for m in a.modes.split(",") if m]
    common = ["--size", a.size, "--model", str(model), "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
              "--response-length", str(a.response_length), "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--threads", str(a.threads)]
    runs = {side: {m: [] for m in modes} for side in sides}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rep in range(a.reps):  # sides and modes alternate, each in a fresh process
        for mode in modes:
            for side in sides:
                wd = WORK / "quant_memory" / f"{a.size}_{stamp}_{side}_{mode}_{rep}"
                wd.mkdir(parents=True, exist_ok=True)
                if side == "align":
                    prepare_stage_runs(model, wd)  # an identity SFT LoRA and a random reward role
                t = time.time()
                runs[side][mode].append(run_worker(pythons[side], Path(__file__), [
                    *common, "--which", side, "--mode", mode, "--workdir", str(wd)], env_extra=MALLOC))
                print(f"{side} {mode}: {runs[side][mode][-1]} ({time.time() - t:.0f} s)", flush=True)
    keys = ("step_s", "steps_peak_mb", "peak_mb", "anon_peak_mb", "response_tokens", "weights_mb")
    med = {side: {m: {k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]} for m, rs in per.items()}
           for side, per in runs.items()}
    if "align" in sides:
        for m in modes:
            med["align"][m]["weights_mb"] = weights_mb(str(model), m)
    name = f"quant_memory_{a.size}_cpu"
    markdown = render(a, med, sides, modes, load0)
    write_results(name, {"runs": runs, "medians": med, "args": vars(a), "machine": machine(),
                         "date": time.strftime("%Y-%m-%d"), "load_average": {"start": load0, "end": load_average("end")}},
                  markdown, Path(a.out))


def with_bitsandbytes(python: str) -> str:
    """The TRL environment, with the bitsandbytes this one has installed into it if it lacks it."""
    import subprocess
    if subprocess.run([python, "-c", "import bitsandbytes"], capture_output=True).returncode != 0:
        from importlib.metadata import version
        subprocess.run([python, "-m", "pip", "install", "-q", f"bitsandbytes=={version('bitsandbytes')}"], check=True)
    return python


def render(a, med: dict, sides: list[str], modes: list[str], load0) -> str:
    model = "SmolLM2-135M-Instruct" if a.size == "smollm2" else f"the {a.size} Llama (random init)"
    title = (f"PPO step on {model}, cpu, float32 compute, rollout {a.batch}, micro-batch {a.micro_batch}, "
             f"{a.response_length} new tokens, LoRA r8 q/v; median of {a.reps} process(es) per side and mode")
    cols = ["model.quantization"]
    if "align" in sides:
        cols += ["align weights (MiB)", "align peak RSS, PPO steps (MiB)", "align peak RSS incl. load (MiB)",
                 "align peak anonymous RSS incl. load (MiB)", "align step (s)", "align peak / align none"]
    if "trl" in sides:
        cols += ["TRL weights (MiB)", "TRL peak RSS, PPO steps (MiB)", "TRL peak RSS incl. load (MiB)",
                 "TRL peak anonymous RSS incl. load (MiB)", "TRL step (s)"]
    if len(sides) == 2:
        cols += ["align / TRL, peak RSS in steps"]
    md = [f"#### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def mb(x: float) -> str:
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    for m in modes:
        cells = [m]
        al, tr = med.get("align", {}).get(m), med.get("trl", {}).get(m)
        if al:
            base = med["align"].get("none", {}).get("steps_peak_mb")
            cells += [mb(al['weights_mb']), f"{al['steps_peak_mb']:,.0f}", f"{al['peak_mb']:,.0f}",
                      f"{al['anon_peak_mb']:,.0f}", f"{al['step_s']:.2f}",
                      f"{al['steps_peak_mb'] / base:.2f}" if base else "–"]
        if tr:
            cells += [mb(tr['weights_mb']), f"{tr['steps_peak_mb']:,.0f}", f"{tr['peak_mb']:,.0f}",
                      f"{tr['anon_peak_mb']:,.0f}", f"{tr['step_s']:.2f}"]
        if al and tr:
            cells.append(f"{al['steps_peak_mb'] / tr['steps_peak_mb']:.2f}")
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "align: policy, reference, value and reward are four LoRA roles on one backbone loaded in the row's "
           "mode." + (" TRL 1.12: policy (peft LoRA; reference = adapters off) and reward model loaded in the row's "
                      "mode, value model float32 (its PPOTrainer trains the whole value model)." if "trl" in sides else ""),
           "", "Peak RSS incl. load counts the pages of the float checkpoint that the loader reads through a memory "
           "map (clean page cache the kernel can drop and read again); peak anonymous RSS is the process's own "
           "memory, load included (RssAnon, sampled every 20 ms).",
           "", f"Machine: {machine()}, {a.threads or 'default'} thread(s) per process, MALLOC_MMAP_THRESHOLD_=131072 "
           f"(RSS follows live tensors); load average at start {load0}."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
