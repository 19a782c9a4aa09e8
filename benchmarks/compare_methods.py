"""Every adapter method and the two finetuning baselines through SFT -> reward -> PPO on the quickstart
task, each method for every role: the method comparison table in docs/adapters.md.

    bash launch/quickstart.sh                                   # once: backbone, data, rankings
    python benchmarks/compare_methods.py --from runs/quickstart # -> benchmarks/results/methods.{json,md}

What is shared. Every method sees the same frozen backbone (the quickstart's pretrained tiny Llama,
found through ``DIR/sft/backbone.json``), the same 2,000 SFT demonstrations, the same PPO prompts
and the same held-out evaluation prompts (``DIR/data/*.jsonl``). The reward data are the quickstart's
imported rankings, i.e. the simulated annotator's rankings of samples of the quickstart's **LoRA** SFT
policy: every method's reward model learns from the same comparisons, which are on-distribution
for LoRA's SFT policy and slightly off it for the others (re-annotating per method would make the
reward data differ between rows).

What each method runs (stage ``run()`` functions called with config dataclasses, the pipeline's
settings for each stage, budgets shortened by the flags):

* SFT: ``--sft-steps`` steps, batch 16, max length 96, warm-up 20, cosine; held-out loss at the end.
* reward: ``init=sft_copy`` (a trainable copy of *this method's* SFT adapters + scalar head),
  ``--reward-epochs`` epochs (or ``--reward-steps``) of the K-wise loss, batch 8, linear decay;
  held-out pairwise accuracy on the imported rankings (split by prompt).
* PPO: policy = copy of the SFT set, value from the reward role, reference = SFT set, reward frozen;
  ``--ppo-iterations`` iterations of 64 rollouts, 4 epochs x 2 minibatches, 32 new tokens,
  temperature 1, KL coefficient 0.05 (fixed).
* eval (``align.evaluate``, as the pipeline's report): SFT vs PPO policy on ``--eval-prompts``
  held-out prompts (gold score mean +- standard error, paired gold difference, KL to SFT), and the
  reward model's accuracy against gold on pairs of this method's SFT samples (K=4 per prompt).

Learning rates are per method (``LRS``), picked by short SFT and reward trials (the comment there
has the numbers); PPO's are LoRA's scaled by a family factor (``--ppo-lrs`` sweeps them). Each method runs in its own process, so its peak
resident memory (``ru_maxrss``) is its own; seconds per step are medians over the run's
``metrics.jsonl`` (SFT and reward: differences of the logged wall clock between consecutive steps;
PPO: ``time/rollout_s + time/update_s``).

PPO on its own. ``--ppo-lrs LR,...`` reruns only PPO and the evaluation for each of ``--methods`` at
each learning rate, from the SFT and reward runs the full run left in ``--work``; ``--reward-of
own,lora`` also (or instead) scores every method's rollouts with LoRA's reward model (which then
initialises the value too, at that method's PPO learning rate: ``ppo.value_lr``), which tells a policy method that cannot move from a reward model that
cannot tell it where to go. Rows go to ``methods/<method>_ppo_lr<lr>[_rm_<rm>].json`` and the table
to ``methods_ppo_lr.{md,json}``; ``--collect`` tabulates finished rows without running anything.

Instead of ``--from DIR``: ``--backbone PATH --data DIR`` (DIR holding ``sft.jsonl``,
``rankings.jsonl``, ``ppo_prompts.jsonl``, ``eval_prompts.jsonl``), as the smoke test does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["lora", "bottleneck", "prefix", "ia3", "prompt", "ptuning", "llama_adapter", "full", "top_k"]
GOLD = "align.demo.tasks.quickstart:gold_scores"
SEED, RESPONSE_LENGTH, TEMPERATURE = 0, 32, 1.0  # every stage and the evaluation
# the pipeline's LoRA: rank 8, alpha 16, every linear layer of attention and MLP
ALL_LINEAR = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# (SFT, reward, PPO) peak learning rates. LoRA's are the quickstart pipeline's. The others come from
# short single-thread trials on the quickstart data:
#   SFT held-out loss after 200 steps over lrs ~3x apart (2026-11-22; untrained 1.344): lora 2e-3
#   1.331 | bottleneck 6e-4 1.336, 2e-3 1.335 (6e-3 worse at 60 steps) | prefix 3e-2 1.333, 1e-1 1.332 |
#   ia3 3e-2 1.333, 1e-1 1.333 | prompt 1e-1 1.338, 3e-1 1.336 | ptuning 3e-2 1.335, 1e-1 1.334 |
#   llama_adapter 3e-2 1.337, 1e-1 1.336 | full 3e-5 1.336, 1e-4 1.333 (3e-4, 1e-3 worse at 60 steps) |
#   top_k 1e-4 1.336, 3e-4 1.335 (1e-3, 3e-3 worse at 60 steps)
#   Reward held-out pairwise accuracy after 3 epochs on the rankings, from the bare backbone
#   (init=base, 312 held-out pairs, 2026-12-01): lora 3e-3 .87 | bottleneck 3e-3 .70, 1e-2 .77,
#   3e-2 .72 | prefix 3e-2 .61, 1e-1 .74 | ia3 3e-2 .75, 1e-1 .81 | prompt 1e-1 .63 | ptuning 3e-2 .59,
#   1e-1 .46 | llama_adapter 3e-2 .58, 1e-1 .62 | full 3e-4 .86 | top_k (1 block) 1e-4 .49, 1e-3 .58,
#   3e-3 .59, 1e-2 .49; with 2 blocks 1e-3 .62, with all 4 blocks 3e-4 .86. One top block of this
#   4-layer model cannot learn the reward: the frozen lower layers do not carry what it needs.
#   P-tuning's MLP encoder at SFT lr 1e-1 (the best SFT loss at 200 steps) blew its folded prompt up
#   to norm 41,500: the gradients reaching it were then ~1e-3 and PPO could not move the policy at
#   all (KL 0.000). At 1e-2 (300 steps): loss 1.3351, norm 197; at 3e-2: 1.3357, norm 1,172.
# Soft prompts, prefixes and scaling vectors want ~10-50x LoRA's steps, finetuning whole blocks ~10x
# smaller ones. PPO lrs were not tuned beyond one fix: LoRA's, scaled by the same family factor,
# except prefix, whose PPO at 1e-2 over-optimised the learned reward (KL 15.3 against a target of
# 6, gold -0.235 +- 0.044 below SFT): 3e-3 (LoRA's) is used.
# The sweep of 2026-12-01 (docs/adapters.md, second methods table; benchmarks/results/methods_ppo_lr.md): 3-10x these
# rates do not make IA3, prompt tuning, P-tuning or LLaMA-Adapter gain gold, with their own reward model or
# LoRA's; bottleneck at 1e-3 stays inside the KL target (4.2, +0.17) where 3e-3 overshoots it (9.2, +0.23).
LRS = {
    "lora": (2e-3, 3e-3, 3e-3),
    "bottleneck": (2e-3, 1e-2, 3e-3),
    "prefix": (1e-1, 1e-1, 3e-3),
    "ia3": (1e-1, 1e-1, 1e-2),
    "prompt": (3e-1, 1e-1, 1e-2),
    "ptuning": (1e-2, 3e-2, 1e-2),
    "llama_adapter": (1e-1, 1e-1, 1e-2),
    "full": (1e-4, 3e-4, 1e-4),
    "top_k": (3e-4, 1e-3, 3e-4),
}


RESULT_KEYS = ("trainable", "backbone_params", "sft_step_s", "reward_step_s", "ppo_iteration_s", "peak_rss_mb",
               "sft_eval_loss", "rm_accuracy", "rm_accuracy_vs_gold", "gold_sft", "gold_ppo", "gold_diff")


def adapter_config(method: str):
    from align.adapters.base import AdapterConfig
    if method == "lora":
        return AdapterConfig(method="lora", r=8, alpha=16, target_modules=ALL_LINEAR)
    if method == "top_k":
        return AdapterConfig(method="top_k", top_k=1)
    return AdapterConfig(method=method)  # the method's defaults (8 virtual tokens, bottleneck 16, ...)


def inputs(a) -> dict:
    """Backbone and data paths from --from DIR, or --backbone / --data."""
    src = Path(a.src) if a.src else None
    data = Path(a.data) if a.data else (src / "data" if src else None)
    backbone = a.backbone
    if not backbone and src:
        backbone = json.loads((src / "sft" / "backbone.json").read_text())["path"]
    if not backbone or data is None:
        raise SystemExit("give --from DIR (a quickstart output dir) or --backbone PATH and --data DIR")
    files = {k: data / f"{k}.jsonl" for k in ("sft", "rankings", "ppo_prompts", "eval_prompts")}
    missing = [str(p) for p in [Path(backbone), *files.values()] if not p.exists()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}")
    return {"backbone": str(Path(backbone).resolve()), **{k: str(v.resolve()) for k, v in files.items()}}


# ------------------------------------------------------------------------------- one method
def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def step_seconds(rows: list[dict]) -> float:
    """Median wall seconds of one optimizer step: the trainer logs cumulative ``seconds`` at every
    step (log_every=1); an evaluation between two steps lands in one difference, which the median
    ignores."""
    rows = [r for r in rows if "seconds" in r and "loss" in r]
    d = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    if d:
        return statistics.median(d)
    return rows[-1]["seconds"] / rows[-1]["step"] if rows else float("nan")


def ppo_iteration_seconds(rows: list[dict]) -> float:
    it = [r["time/rollout_s"] + r["time/update_s"] for r in rows if "time/rollout_s" in r]
    return statistics.median(it[1:] if len(it) > 2 else it) if it else float("nan")  # the first warms up


def rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ppo_and_eval(a, io: dict, work: Path, lr_ppo: float, name: str, wall: dict, rm_gold: bool,
                 reward_run: Path | None = None, value_lr: float = 0.0):
    """PPO from ``work/sft`` and ``work/reward`` (or ``reward_run``) into ``work/NAME``, then the
    pipeline's SFT-vs-PPO evaluation (and, with ``rm_gold``, the reward model's accuracy against gold)."""
    reward_run = reward_run or work / "reward"
    from align.evaluate import EvalConfig, compare, rm_accuracy_vs_gold
    from align.stages import ppo as ppo_stage
    seed, response_length, temperature = SEED, RESPONSE_LENGTH, TEMPERATURE
    t = time.time()
    p = ppo_stage.PPOConfig(output_dir=str(work / name), sft_run=str(work / "sft"), reward_run=str(reward_run))
    p.data.prompts, p.data.eval_prompts = io["ppo_prompts"], io["eval_prompts"]
    q = p.ppo
    q.seed, q.iterations, q.rollout_batch_size = seed, a.ppo_iterations, a.rollout_batch_size
    q.micro_batch_size, q.num_minibatches, q.num_ppo_epochs = min(32, a.rollout_batch_size // 2), 2, 4
    q.response_length, q.temperature, q.lr, q.value_lr = response_length, temperature, lr_ppo, value_lr
    q.kl_coef, q.kl_controller, q.kl_target = 0.05, "fixed", 6.0
    p.eval.every, p.eval.num_prompts, p.eval.temperature, p.eval.gold = 0, min(64, a.eval_prompts), temperature, GOLD
    p.tracking.wandb = False
    ppo_sum = ppo_stage.run(p)
    wall["ppo"] = time.time() - t

    t = time.time()
    ev = EvalConfig(sft_run=str(work / "sft"), reward_run=str(reward_run), policy_a="sft",
                    policy_b=str(work / name), prompts=io["eval_prompts"], num_prompts=a.eval_prompts,
                    temperature=temperature, response_length=response_length, gold=GOLD, seed=seed)
    cmp = compare(ev)
    acc = rm_accuracy_vs_gold(ev, k=4) if rm_gold else {}
    wall["eval"] = time.time() - t
    return ppo_sum, cmp, acc


def comparison_fields(cmp: dict) -> dict:
    """A result row's part from ``align.evaluate.compare`` (a = SFT policy, b = PPO policy)."""
    return {"gold_sft": cmp["a"]["gold_mean"], "gold_sft_sem": cmp["a"]["gold_sem"],
            "gold_ppo": cmp["b"]["gold_mean"], "gold_ppo_sem": cmp["b"]["gold_sem"],
            "gold_diff": cmp["gold_diff_mean"], "gold_diff_sem": cmp["gold_diff_sem"],
            "win_rate_by_gold": cmp["win_rate_b_by_gold"], "kl_ppo": cmp["b"]["kl_to_sft_mean"],
            "reward_ppo": cmp["b"].get("reward_mean"),
            "stop_rate_sft": cmp["a"]["stop_rate"], "stop_rate_ppo": cmp["b"]["stop_rate"],
            "n_eval_prompts": cmp["n_prompts"]}


def sweep_run(method: str, lr: float, rm: str) -> str:
    """The run dir (under the method's work dir) of one sweep row; with the method, its file names."""
    return f"ppo_lr{lr:g}" + (f"_rm_{rm}" if rm not in ("own", method) else "")


def sweep_worker(a) -> dict:
    """PPO alone at ``--ppo-lr``, from the SFT and reward runs an earlier full run of this method
    left in ``--work-dir`` (with ``--reward-dir``, another method's reward run, whose reward role
    then also initialises the value): one row of the PPO learning-rate sweep."""
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    m, io, work = a.method, inputs(a), Path(a.work_dir)
    missing = [str(work / d) for d in ("sft", "reward") if not (work / d / "config.yaml").exists()]
    if missing:
        raise SystemExit(f"--ppo-lrs needs this method's full run first (missing {', '.join(missing)})")
    reward_run = Path(a.reward_dir) if a.reward_dir else work / "reward"
    if not (reward_run / "roles.json").exists():
        raise SystemExit(f"no reward run in {reward_run}")
    name = sweep_run(m, a.ppo_lr, a.reward_of)
    if (work / name).exists():
        shutil.rmtree(work / name)
    wall: dict[str, float] = {}
    # another method's reward role also initialises the value, which then learns at that method's PPO rate
    value_lr = LRS[a.reward_of][2] if a.reward_of not in ("own", m) else 0.0
    ppo_sum, cmp, _ = ppo_and_eval(a, io, work, a.ppo_lr, name, wall, rm_gold=False, reward_run=reward_run,
                                   value_lr=value_lr)
    rows = read_metrics(work / name)
    return {"method": m, "ppo_lr": a.ppo_lr, "value_lr": value_lr or a.ppo_lr,
            "rm": m if a.reward_of == "own" else a.reward_of,
            "ppo_iterations": ppo_sum["iterations"], "ppo_iteration_s": ppo_iteration_seconds(rows),
            **comparison_fields(cmp), "seconds_per_stage": wall, "threads": torch.get_num_threads()}


def worker(a) -> dict:
    start_rss = rss_mb()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)

    from align.stages import reward as reward_stage
    from align.stages import sft as sft_stage
    m, io, work = a.method, inputs(a), Path(a.work_dir)
    if work.exists():
        shutil.rmtree(work)  # a half-finished earlier attempt: start clean
    work.mkdir(parents=True)
    lr_sft, lr_rm, lr_ppo = LRS[m]
    seed, response_length = SEED, RESPONSE_LENGTH
    wall: dict[str, float] = {}
    import_rss = rss_mb()

    # 1. SFT (the pipeline's settings) ---------------------------------------------------------
    t = time.time()
    s = sft_stage.SFTConfig(output_dir=str(work / "sft"))
    s.model.path, s.adapter = io["backbone"], adapter_config(m)
    s.data.train, s.data.eval_fraction = io["sft"], 0.05
    s.data.max_length, s.data.max_new_tokens = 96, response_length
    s.train.max_steps, s.train.lr, s.train.batch_size = a.sft_steps, lr_sft, 16
    s.train.warmup_steps, s.train.seed = min(20, a.sft_steps // 10), seed
    s.train.eval_every, s.train.log_every = a.sft_steps, 1  # held-out loss at 0 and at the end
    s.tracking.wandb = False
    sft_sum = sft_stage.run(s)
    wall["sft"] = time.time() - t

    # 2. reward model, a trainable copy of this method's SFT adapters + head --------------------
    t = time.time()
    r = reward_stage.RewardConfig(output_dir=str(work / "reward"), sft_run=str(work / "sft"), init="sft_copy")
    r.data.train, r.data.eval_fraction, r.data.max_length = io["rankings"], 0.1, 96
    r.train.lr, r.train.batch_size, r.train.seed = lr_rm, 8, seed
    r.train.max_steps, r.train.epochs, r.train.scheduler = a.reward_steps, a.reward_epochs, "linear"
    r.train.eval_every, r.train.log_every = 0, 1  # held-out accuracy at the end
    r.normalize.max_new_tokens = response_length
    r.normalize.num_prompts = a.normalize_prompts
    r.tracking.wandb = False
    rm_sum = reward_stage.run(r)
    wall["reward"] = time.time() - t

    ppo_sum, cmp, acc = ppo_and_eval(a, io, work, lr_ppo, "ppo", wall, rm_gold=a.rm_gold)

    sft_rows, rm_rows, ppo_rows = (read_metrics(work / d) for d in ("sft", "reward", "ppo"))
    sft_eval = [x for x in sft_rows if "eval/loss" in x]
    return {
        "method": m, "lrs": {"sft": lr_sft, "reward": lr_rm, "ppo": lr_ppo},
        "adapter": adapter_config(m).to_dict(),
        "backbone_params": ppo_sum["backbone_params"],
        "trainable": {"sft": sft_sum["trainable_params"], "reward": rm_sum["trainable_params"],
                      "policy": ppo_sum["trainable_params"]["policy"], "value": ppo_sum["trainable_params"]["value"]},
        "sft_step_s": step_seconds(sft_rows), "reward_step_s": step_seconds(rm_rows),
        "ppo_iteration_s": ppo_iteration_seconds(ppo_rows),
        "sft_steps": sft_sum["steps"], "reward_steps": rm_sum["steps"], "ppo_iterations": ppo_sum["iterations"],
        "peak_rss_mb": rss_mb(), "rss_after_imports_mb": import_rss, "rss_at_start_mb": start_rss,
        "sft_eval_loss_start": sft_eval[0]["eval/loss"], "sft_eval_loss": sft_eval[-1]["eval/loss"],
        "rm_accuracy": rm_sum["eval/accuracy"], "rm_eval_pairs": rm_sum["eval/pairs"],
        "rm_accuracy_vs_gold": acc.get("rm_accuracy_vs_gold"), "rm_gold_pairs": acc.get("rm_eval_pairs"),
        **comparison_fields(cmp),
        "ppo_stage_final_eval": {k: v for k, v in ppo_sum.items() if k.startswith("eval/")},
        "seconds_per_stage": wall, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------- the table
def _f(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table_head(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def failed_row(r: dict, columns: int) -> str:
    return f"| `{r['method']}` | failed: {r['error'][:100]} |" + " |" * (columns - 2)


def markdown(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    n = ok[0]["backbone_params"] if ok else 0
    lora = next((r for r in ok if r["method"] == "lora"), ok[0] if ok else None)
    a = meta["args"]
    rm = f"{a['reward_steps']} steps" if a["reward_steps"] else f"{a['reward_epochs']:g} epochs"
    out = ["---", f"measured: {meta['date']}", f"machine: {meta['machine']}", "---",  # run history: front matter
           f"#### Methods on the quickstart task ({n:,}-parameter frozen backbone; SFT {a['sft_steps']} steps, "
           f"reward {rm}, PPO {a['ppo_iterations']} iterations)", "",
           *table_head(["method", "trainable: policy (% of backbone)", "reward / value", "lr SFT / RM / PPO",
                        "SFT s/step", "RM s/step", "PPO s/iter", "peak RSS (MiB)", "SFT held-out loss",
                        "RM held-out acc.", "RM acc. vs gold", "gold SFT", "gold PPO", "gold PPO − SFT (paired)",
                        "KL to SFT"])]
    for r in rows:
        if "error" in r:
            out.append(failed_row(r, 15))
            continue
        t, lr = r["trainable"], r["lrs"]
        out.append(
            f"| `{r['method']}` | {t['policy']:,} ({100 * t['policy'] / r['backbone_params']:.2f}%) "
            f"| {t['reward']:,} / {t['value']:,} | {lr['sft']:g} / {lr['reward']:g} / {lr['ppo']:g} "
            f"| {_f(r['sft_step_s'], '.3f')} | {_f(r['reward_step_s'], '.3f')} | {_f(r['ppo_iteration_s'], '.2f')} "
            f"| {r['peak_rss_mb']:,.0f} | {_f(r['sft_eval_loss'], '.3f')} | {_f(r['rm_accuracy'], '.3f')} "
            f"| {_f(r['rm_accuracy_vs_gold'], '.3f')} "
            f"| {r['gold_sft']:.3f} ± {r['gold_sft_sem']:.3f} | {r['gold_ppo']:.3f} ± {r['gold_ppo_sem']:.3f} "
            f"| {r['gold_diff']:+.3f} ± {r['gold_diff_sem']:.3f} | {_f(r['kl_ppo'], '.2f')} |")
    if lora:
        out += ["", f"Every method uses the same backbone, data and rankings (annotated on samples of the "
                f"quickstart's LoRA SFT policy); gold scores are mean ± standard error over "
                f"{lora['n_eval_prompts']} held-out prompts, the same for every row. Held-out SFT loss of the "
                f"backbone before SFT: {lora['sft_eval_loss_start']:.3f}. Peak RSS is the whole method run's "
                f"process (SFT, reward, PPO, eval); Python, torch and the libraries alone take about "
                f"{lora['rss_after_imports_mb']:,.0f} MiB of it. {meta['args'].get('note') or ''} "
                f"Regenerate: `{meta['command']}`."]
    return "\n".join(out) + "\n"


def complete(res: dict) -> bool:
    """A finished result of this script's current layout (not a failure, not an older schema)."""
    return "error" not in res and all(k in res for k in RESULT_KEYS)


def critic_ev(run: Path) -> float | None:
    """The value's explained variance of the returns, mean over a PPO run's last 10 iterations
    (from its metrics.jsonl in --work; None when that run dir is gone)."""
    f = run / "metrics.jsonl"
    if not f.exists():
        return None
    ev = [r["value/explained_variance"] for r in read_metrics(run) if "value/explained_variance" in r]
    return statistics.mean(ev[-10:]) if ev else None


def sweep(a, methods: list[str], per: Path, work: Path, run_worker, command: str) -> int:
    """The PPO learning-rate sweep: PPO + eval per (method, lr), next to the full run's row."""
    lrs = [float(x) for x in a.ppo_lrs.split(",") if x.strip()]
    rows = []
    for m in methods:
        full = per / f"{m}.json"
        if not full.exists() or not complete(json.loads(full.read_text())):
            raise SystemExit(f"--ppo-lrs: no finished full run of {m} in {full}; run without --ppo-lrs first")
        base = json.loads(full.read_text())
        rows.append({**{k: base[k] for k in ("method", "gold_sft", "gold_sft_sem", "gold_ppo", "gold_ppo_sem",
                                              "gold_diff", "gold_diff_sem", "kl_ppo", "ppo_iteration_s",
                                              "n_eval_prompts")},
                     "ppo_lr": base["lrs"]["ppo"], "rm": m, "rm_accuracy_vs_gold": base["rm_accuracy_vs_gold"],
                     "table": True, "value_ev_last10": critic_ev(work / m / "ppo")})
        for rm in [m if x in ("", "own") else x for x in a.reward_of.split(",")]:
            rm_row = json.loads((per / f"{rm}.json").read_text()) if (per / f"{rm}.json").exists() else None
            if rm_row is None or not complete(rm_row):
                raise SystemExit(f"--reward-of {rm}: no finished full run of {rm} in {per}")
            for lr in lrs:
                if lr == base["lrs"]["ppo"] and rm == m:
                    continue  # the table's own row
                tag = f"{m}_{sweep_run(m, lr, rm)}"
                f = per / f"{tag}.json"
                if (a.resume or a.collect) and f.exists() and "error" not in json.loads(f.read_text()):
                    print(f"[compare_methods] {tag}: kept {f}", file=sys.stderr)
                    res = json.loads(f.read_text())
                elif a.collect:
                    continue
                else:
                    res = run_worker(tag, ["--method", m, "--work-dir", str(work / m), "--ppo-lr", str(lr),
                                           "--reward-of", rm, "--reward-dir", str(work / rm / "reward")],
                                     f, work / f"{tag}.log")
                rows.append({**res, "rm": rm, "ppo_lr": lr, "rm_accuracy_vs_gold": rm_row["rm_accuracy_vs_gold"],
                             "value_ev_last10": critic_ev(work / m / sweep_run(m, lr, rm))})
    out = Path(a.out)
    lines = ["---", f"measured: {time.strftime('%Y-%m-%d')}", f"machine: {machine()}", "---",
             f"#### PPO learning rate and reward model per method (quickstart task, PPO {a.ppo_iterations} "
             f"iterations from each method's SFT run of the table above)", "",
             "| policy method | PPO lr | reward model (and value init) | RM acc. vs gold | gold PPO − SFT (paired) "
             "| KL to SFT | value expl. var. (last 10 it.) | PPO s/iter |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['method']}` | {r.get('ppo_lr', '?')} | `{r.get('rm', '?')}` "
                         f"| failed: {r['error'][:100]} | | | | |")
            continue
        mark = " (table)" if r.get("table") else ""
        lines.append(f"| `{r['method']}` | {r['ppo_lr']:g}{mark} | `{r['rm']}` | {_f(r.get('rm_accuracy_vs_gold'), '.3f')} "
                     f"| {r['gold_diff']:+.3f} ± {r['gold_diff_sem']:.3f} | {_f(r['kl_ppo'], '.2f')} "
                     f"| {_f(r.get('value_ev_last10'), '+.2f')} | {_f(r['ppo_iteration_s'], '.2f')} |")
    lines += ["", f"\"(table)\" rows are the method table's runs; the others rerun only PPO and the evaluation "
              f"from the same SFT adapters, seed, prompts and {rows[0]['n_eval_prompts'] if rows else 0} held-out "
              f"eval prompts, scored by the reward model named (whose reward role also initialises the value, "
              f"which then learns at that method's PPO rate). "
              f"{a.note or ''} " + (f"Tabulated by `{command} --collect`." if a.collect else f"Regenerate: `{command}`.")]
    md = "\n".join(lines) + "\n"
    (out / "methods_ppo_lr.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                                         "command": command, "rows": rows}, indent=2))
    (out / "methods_ppo_lr.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"1 {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{os.cpu_count()} CPU cores"


def parse_arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--from", dest="src", default=None,
                    help="a quickstart output dir: data/*.jsonl and sft/backbone.json (default runs/quickstart "
                         "unless --backbone and --data are given)")
    ap.add_argument("--backbone", default="", help="backbone directory (instead of --from's)")
    ap.add_argument("--data", default="", help="dir with sft/rankings/ppo_prompts/eval_prompts .jsonl (instead of --from's)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--reward-epochs", type=float, default=3.0)
    ap.add_argument("--reward-steps", type=int, default=0, help=">0 overrides --reward-epochs")
    ap.add_argument("--ppo-iterations", type=int, default=80)
    ap.add_argument("--rollout-batch-size", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts in the final SFT-vs-PPO eval")
    ap.add_argument("--normalize-prompts", type=int, default=64, help="prompts for the reward normalisation")
    ap.add_argument("--no-rm-gold", dest="rm_gold", action="store_false",
                    help="skip the reward model's accuracy vs gold (K=4 SFT samples on the eval prompts)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="methods.json, methods.md, methods/")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "methods"), help="run dirs per method")
    ap.add_argument("--resume", action="store_true", help="keep methods whose result file exists (failed ones rerun)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per method process (0: torch's default)")
    ap.add_argument("--note", default="", help="a sentence for the table's footnote (e.g. how the runs shared the machine)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per method (0: none)")
    ap.add_argument("--ppo-lrs", default="",
                    help="comma-separated PPO learning rates: rerun only PPO + eval for each of --methods at each, "
                         "from the SFT and reward runs a full run left in --work; writes methods_ppo_lr.{md,json}")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reward-of", default="own",
                    help="with --ppo-lrs: whose reward runs to use, comma-separated: own (each method's) and/or a "
                         "method (e.g. lora: its reward model, which also initialises the value, for every policy "
                         "method; tells a weak policy method from a weak reward model)")
    ap.add_argument("--collect", action="store_true",
                    help="with --ppo-lrs: run nothing, tabulate the finished results among those combinations")
    ap.add_argument("--ppo-lr", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--reward-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.src is None and not (a.backbone and a.data):
        a.src = "runs/quickstart"
    return a


def regenerate_command(argv) -> str:
    """The command line that regenerates every row: the arguments less --resume, --collect and --note."""
    passed, skip = [], False
    for x in (argv if argv is not None else sys.argv[1:]):
        if skip or x in ("--resume", "--collect") or x.startswith("--note"):
            skip = x == "--note"
            continue
        passed.append(x)
    return "python benchmarks/compare_methods.py " + shlex.join(passed)


def worker_runner(a, io: dict):
    """``run_worker(label, extra, f, log)``: one worker process on ``io``'s backbone and data with
    ``extra`` arguments, writing its result to ``f`` (its output to ``log``); a failure becomes a row
    with the error."""
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    common = ["--backbone", io["backbone"], "--data", str(Path(io["sft"]).parent),
              "--ppo-iterations", str(a.ppo_iterations), "--rollout-batch-size", str(a.rollout_batch_size),
              "--eval-prompts", str(a.eval_prompts)] + (["--threads", str(a.threads)] if a.threads else [])

    def run_worker(label: str, extra: list[str], f: Path, log: Path) -> dict:
        f.unlink(missing_ok=True)
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--result", str(f), *common, *extra]
        print(f"[compare_methods] {label}: running (log {log})", file=sys.stderr, flush=True)
        t = time.time()
        with open(log, "w") as lf:
            try:
                rc = subprocess.run(args, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    timeout=a.timeout or None).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {a.timeout:g} s"
        if rc == 0 and f.exists():
            res = json.loads(f.read_text())
        else:
            tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
            err = next((x for x in reversed(tail) if "Error" in x or "Exception" in x), tail[-1] if tail else "")
            res = {"method": label.split()[0], "error": f"exit {rc}: {err.strip()}", "log": str(log)}
        res["wall_s"] = time.time() - t
        f.write_text(json.dumps(res, indent=2))
        brief = {k: res.get(k) for k in ("sft_eval_loss", "rm_accuracy", "gold_sft", "gold_ppo", "kl_ppo", "error")
                 if k in res}
        print(f"[compare_methods] {label}: {res['wall_s']:.0f} s {brief}", file=sys.stderr, flush=True)
        return res

    return run_worker


def method_rows(a, methods: list[str], per: Path, work: Path, run_worker) -> list[dict]:
    """The method table's rows: one full run per method (a finished one kept with --resume)."""
    rows = []
    for m in methods:
        f = per / f"{m}.json"
        if a.resume and f.exists() and complete(json.loads(f.read_text())):
            print(f"[compare_methods] {m}: kept {f}", file=sys.stderr)
            rows.append(json.loads(f.read_text()))
            continue
        rows.append(run_worker(m, ["--method", m, "--work-dir", str(work / m), "--sft-steps", str(a.sft_steps),
                                   "--reward-epochs", str(a.reward_epochs), "--reward-steps", str(a.reward_steps),
                                   "--normalize-prompts", str(a.normalize_prompts)]
                               + ([] if a.rm_gold else ["--no-rm-gold"]), f, work / f"{m}.log"))
    return rows


def main(argv=None):
    a = parse_arguments(argv)
    if a.worker:
        res = sweep_worker(a) if a.ppo_lr else worker(a)
        Path(a.result).write_text(json.dumps(res, indent=2))
        return
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LRS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    io = inputs(a)
    out, work = Path(a.out), Path(a.work)
    per = out / "methods"
    per.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = regenerate_command(argv)
    run_worker = worker_runner(a, io)
    if a.ppo_lrs:
        return sweep(a, methods, per, work, run_worker, command)
    rows = method_rows(a, methods, per, work, run_worker)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "inputs": io,
            "args": {k: v for k, v in vars(a).items() if k not in ("worker", "method", "work_dir", "result", "resume")},
            "command": command.strip()}
    md = markdown(rows, meta)
    (out / "methods.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "methods.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
