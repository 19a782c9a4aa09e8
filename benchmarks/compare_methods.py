"""Every adapter method (and the full / top-k finetuning baselines) through SFT -> reward -> PPO on
the quickstart task, each with that method for every role: the README's comparison table.

    bash launch/quickstart.sh                      # once: backbone, data and rankings
    python benchmarks/compare_methods.py --from runs/quickstart

Every method sees the same backbone (the quickstart's pretrained tiny Llama), the same SFT
demonstrations, the same rankings (annotated on samples of the quickstart's LoRA SFT policy) and the
same PPO and held-out prompts, with shortened budgets (flags below). Each method runs in its own
process, so its peak resident memory is its own. Learning rates: one per family (below), not tuned
per method beyond that.

Columns: trainable parameters of the policy (% of the backbone); median seconds per SFT step,
reward step and PPO iteration; peak resident memory of the whole method run; SFT held-out loss;
reward-model held-out pairwise accuracy; the PPO policy's gold score at the end and the SFT
policy's (PPO iteration 0), on the same held-out prompts, mean +- standard error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["lora", "bottleneck", "prefix", "ia3", "prompt", "ptuning", "llama_adapter", "full", "top_k"]
# (SFT lr, reward lr, PPO lr) per family: soft prompts and scaling vectors want larger steps,
# finetuning whole blocks much smaller ones.
LRS = {"lora": (2e-3, 3e-3, 3e-3), "bottleneck": (2e-3, 3e-3, 3e-3), "prefix": (1e-2, 1e-2, 3e-3),
       "ia3": (1e-2, 1e-2, 1e-2), "prompt": (3e-2, 1e-2, 3e-3), "ptuning": (1e-2, 1e-2, 3e-3),
       "llama_adapter": (1e-2, 1e-2, 3e-3), "full": (3e-4, 3e-4, 1e-4), "top_k": (1e-3, 1e-3, 3e-4)}
ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def adapter_overrides(method: str) -> list[str]:
    out = [f"adapter.method={method}"]
    if method == "lora":
        out += ["adapter.r=8", "adapter.alpha=16", f"adapter.target_modules={ALL_LINEAR}"]
    elif method == "top_k":
        out += ["adapter.top_k=1"]
    elif method in ("prefix", "prompt", "ptuning", "llama_adapter"):
        out += ["adapter.num_virtual_tokens=8"]
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def step_seconds(rows: list[dict]) -> float:
    rows = [r for r in rows if "seconds" in r and "loss" in r]
    d = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(d) if d else float("nan")


def worker(a) -> dict:
    import resource

    import align.stages.ppo as ppo
    import align.stages.reward as reward
    import align.stages.sft as sft
    from align.config import load_config
    src, out, m = Path(a.src), Path(a.out_dir), a.method
    backbone = json.loads((src / "sft" / "backbone.json").read_text())["path"]
    lr_sft, lr_rm, lr_ppo = LRS[m]
    common = ["tracking.wandb=false", "train.seed=0"]
    ad = adapter_overrides(m)
    sft.run(load_config(sft.SFTConfig, None, [
        f"output_dir={out / 'sft'}", f"model.path={backbone}", f"data.train={src / 'data' / 'sft.jsonl'}",
        "data.eval_fraction=0.05", "data.max_length=96", "data.num_samples=0", f"train.max_steps={a.sft_steps}",
        f"train.lr={lr_sft}", "train.batch_size=16", "train.warmup_steps=20", "train.log_every=1",
        f"train.eval_every={a.sft_steps}", *ad, *common]))
    rm = reward.run(load_config(reward.RewardConfig, None, [
        f"output_dir={out / 'reward'}", f"sft_run={out / 'sft'}", f"data.train={src / 'data' / 'rankings.jsonl'}",
        "data.eval_fraction=0.1", "data.max_length=96", f"train.epochs={a.reward_epochs}", f"train.lr={lr_rm}",
        "train.batch_size=8", "train.scheduler=linear", "train.log_every=1", "normalize.max_new_tokens=32",
        "normalize.num_prompts=64", *common]))
    p = ppo.run(load_config(ppo.PPOConfig, None, [
        f"output_dir={out / 'ppo'}", f"sft_run={out / 'sft'}", f"reward_run={out / 'reward'}",
        f"data.prompts={src / 'data' / 'ppo_prompts.jsonl'}", f"data.eval_prompts={src / 'data' / 'eval_prompts.jsonl'}",
        f"ppo.iterations={a.ppo_iterations}", "ppo.rollout_batch_size=64", "ppo.micro_batch_size=32",
        "ppo.num_minibatches=2", "ppo.response_length=32", "ppo.temperature=1.0", f"ppo.lr={lr_ppo}",
        "ppo.kl_coef=0.05", f"eval.every={a.ppo_iterations}", f"eval.num_prompts={a.eval_prompts}",
        "eval.temperature=1.0", "eval.gold=align.quickstart.task:gold_scores", "tracking.wandb=false"]))
    sft_rows, rm_rows, ppo_rows = metrics(out / "sft"), metrics(out / "reward"), metrics(out / "ppo")
    sft_eval = [r for r in sft_rows if "eval/loss" in r]
    ppo_eval = [r for r in ppo_rows if "eval/gold" in r]
    ppo_it = [r["time/rollout_s"] + r["time/update_s"] for r in ppo_rows if "time/rollout_s" in r]
    ppo_it = ppo_it[1:] or ppo_it  # the first iteration warms up
    return {"method": m, "trainable_policy": p["trainable_params"]["policy"], "backbone_params": p["backbone_params"],
            "sft_step_s": step_seconds(sft_rows), "reward_step_s": step_seconds(rm_rows),
            "ppo_iteration_s": statistics.median(ppo_it), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sft_eval_loss_start": sft_eval[0]["eval/loss"], "sft_eval_loss": sft_eval[-1]["eval/loss"],
            "rm_accuracy": rm["eval/accuracy"], "gold_sft": ppo_eval[0]["eval/gold"], "gold_sft_sem": ppo_eval[0]["eval/gold_sem"],
            "gold_ppo": ppo_eval[-1]["eval/gold"], "gold_ppo_sem": ppo_eval[-1]["eval/gold_sem"],
            "kl_ppo": ppo_eval[-1]["eval/kl"], "lrs": LRS[m]}


def markdown(rows: list[dict], a) -> str:
    head = ("| method | trainable (policy) | % of backbone | SFT s/step | RM s/step | PPO s/iter | peak RSS (MiB) "
            "| SFT held-out loss | RM held-out acc. | gold: SFT → PPO | KL |")
    n = next((r["backbone_params"] for r in rows if "backbone_params" in r), 0)
    out = [f"#### Methods on the quickstart task ({n:,}-parameter backbone; SFT "
           f"{a.sft_steps} steps, reward {a.reward_epochs} epochs, PPO {a.ppo_iterations} iterations, "
           f"{a.eval_prompts} held-out prompts; 2 CPU cores)", "", head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            out.append(f"| `{r['method']}` | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        out.append(
            f"| `{r['method']}` | {r['trainable_policy']:,} | {100 * r['trainable_policy'] / r['backbone_params']:.2f} "
            f"| {r['sft_step_s']:.3f} | {r['reward_step_s']:.3f} | {r['ppo_iteration_s']:.2f} | {r['peak_rss_mb']:,.0f} "
            f"| {r['sft_eval_loss_start']:.2f} → {r['sft_eval_loss']:.2f} | {r['rm_accuracy']:.3f} "
            f"| {r['gold_sft']:.3f} → {r['gold_ppo']:.3f} ± {r['gold_ppo_sem']:.3f} | {r['kl_ppo']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", default="runs/quickstart", help="a quickstart run dir (data + backbone)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--reward-epochs", type=float, default=2.0)
    ap.add_argument("--ppo-iterations", type=int, default=20)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--resume", action="store_true", help="keep methods whose result file exists")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    out = Path(a.out)
    per = out / "methods"
    per.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in a.methods.split(","):
        f = per / f"{m}.json"
        if not (a.resume and f.exists()):
            work = Path(__file__).resolve().parent / ".work" / "methods" / f"{m}-{int(time.time())}"
            args = [sys.executable, __file__, "--worker", "--method", m, "--from", a.src, "--out-dir", str(work),
                    "--sft-steps", str(a.sft_steps), "--reward-epochs", str(a.reward_epochs),
                    "--ppo-iterations", str(a.ppo_iterations), "--eval-prompts", str(a.eval_prompts)]
            t = time.time()
            r = subprocess.run(args, capture_output=True, text=True,
                               env={**__import__("os").environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
            if r.returncode == 0:
                res = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
            else:
                res = {"method": m, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
                (per / f"{m}.stderr.txt").write_text(r.stderr[-20000:])
            res["wall_s"] = time.time() - t
            f.write_text(json.dumps(res, indent=2))
            print(f"[compare_methods] {m}: {res}", file=sys.stderr)
        rows.append(json.loads(f.read_text()))
    md = markdown([r for r in rows if "error" not in r] + [r for r in rows if "error" in r], a)
    (out / "methods.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(a), "rows": rows},
                                                 indent=2))
    (out / "methods.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
