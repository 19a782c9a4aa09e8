"""PPO, GRPO, Dr. GRPO, RLOO and DPO on the quickstart task at equal budgets, from one SFT run
and one reward run: the policy-optimisation table in docs/grpo-rloo.md.

    bash launch/quickstart.sh                                  # once: backbone, SFT, rankings, reward
    python benchmarks/compare_po.py --from runs/quickstart     # -> benchmarks/results/po_methods.{json,md}

Shared by every row: the quickstart's SFT run (the reference and the initial policy), its reward
run (the online methods' reward; DPO trains on the same imported rankings the reward model saw),
its PPO prompts and its held-out evaluation prompts. The online methods sample the same number of
responses: ``--iterations`` x 64 (PPO: 64 prompts; GRPO/RLOO: 16 prompts x 4 samples), 32 new
tokens, temperature 1, learning rate 3e-3, KL coefficient 0.05 (PPO: per-token k1 in the reward,
fixed; GRPO: k3 in the loss; RLOO: k1 in the reward); PPO 4 epochs x 2 minibatches as the
quickstart, GRPO/RLOO 2 x 2. Each method runs in its own process (its peak resident memory,
``ru_maxrss``, is its own, evaluation included); ``align eval`` then compares SFT with each
policy on ``--eval-prompts`` held-out prompts (gold score, paired gold gain +- SEM, KL to SFT,
learned reward).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOLD = "align.demo.tasks.quickstart:gold_scores"
METHODS = ("ppo", "grpo", "dr_grpo", "rloo", "dpo")
# PPO's critic variants (not in the default list): a value head on the policy's adapters, and the
# same with the value loss kept out of the shared adapters
VARIANTS = {"ppo_shared": ["value.share_policy=true"],
            "ppo_shared_sg": ["value.share_policy=true", "value.stop_gradient=true"],
            "ppo_shared_vlr": ["value.share_policy=true", "ppo.value_lr=0.03"]}


def stage_args(method: str, q: Path, out: Path, iterations: int) -> tuple[str, list[str]]:
    common = [f"output_dir={out}", f"sft_run={q / 'sft'}", "tracking.wandb=false"]
    online = [f"data.prompts={q / 'data' / 'ppo_prompts.jsonl'}", f"data.eval_prompts={q / 'data' / 'eval_prompts.jsonl'}",
              f"reward_run={q / 'reward'}", "eval.every=0", "eval.num_prompts=64", f"eval.gold={GOLD}"]
    if method == "ppo" or method in VARIANTS:
        return "ppo", common + online + VARIANTS.get(method, []) + [f"ppo.iterations={iterations}", "ppo.rollout_batch_size=64",
                                         "ppo.micro_batch_size=32", "ppo.num_minibatches=2", "ppo.num_ppo_epochs=4",
                                         "ppo.response_length=32", "ppo.temperature=1.0", "ppo.lr=3e-3",
                                         "ppo.kl_coef=0.05", "value.init=reward"]
    if method in ("grpo", "dr_grpo", "rloo"):
        s = "rloo" if method == "rloo" else "grpo"
        extra = [f"{s}.loss_type=dr_grpo"] if method == "dr_grpo" else []
        return s, common + online + extra + [
            f"{s}.iterations={iterations}", f"{s}.rollout_batch_size=64", f"{s}.group_size=4",
            f"{s}.micro_batch_size=32", f"{s}.num_minibatches=2", f"{s}.num_epochs=2", f"{s}.response_length=32",
            f"{s}.temperature=1.0", f"{s}.lr=3e-3", f"{s}.kl_coef=0.05"]
    if method == "dpo":
        return "dpo", common + [f"data.train={q / 'data' / 'rankings.jsonl'}"]
    raise SystemExit(f"unknown method {method}")


def worker(a) -> dict:
    from align.cli import main as align_main
    from align.evaluate import EvalConfig, compare
    q, out = Path(a.quickstart), Path(a.work) / a.method
    stage, args = stage_args(a.method, q, out, a.iterations)
    t = time.time()
    if not (out / "summary.json").exists():
        rc = align_main([stage, *args])
        if rc != 0:
            raise SystemExit(f"align {stage} failed ({rc})")
    train_s = time.time() - t
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev_ = [m["value/explained_variance"] for m in logged if "value/explained_variance" in m]
    step = [m["time/rollout_s"] + m["time/update_s"] for m in logged if "time/update_s" in m]
    ev = EvalConfig(sft_run=str(q / "sft"), reward_run=str(q / "reward"), policy_a="sft", policy_b=str(out),
                    prompts=str(q / "data" / "eval_prompts.jsonl"), num_prompts=a.eval_prompts, temperature=1.0,
                    response_length=32, gold=GOLD, seed=0)
    cmp = compare(ev)
    return {"method": a.method, "train_s": train_s, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gold_sft": cmp["a"]["gold_mean"], "gold_policy": cmp["b"]["gold_mean"],
            "gold_gain": cmp["gold_diff_mean"], "gold_gain_sem": cmp["gold_diff_sem"],
            "kl_to_sft": cmp["b"]["kl_to_sft_mean"], "reward_sft": cmp["a"]["reward_mean"],
            "reward_policy": cmp["b"]["reward_mean"], "win_rate_by_gold": cmp["win_rate_b_by_gold"],
            "stop_rate": cmp["b"]["stop_rate"], "n_prompts": cmp["n_prompts"],
            "explained_variance_last10": sum(ev_[-10:]) / len(ev_[-10:]) if ev_ else None,
            "step_s_median": sorted(step)[len(step) // 2] if step else None}


def markdown(rows: list[dict], a) -> str:
    lines = [f"#### Policy optimisation on the quickstart task ({a.iterations} iterations x 64 sampled responses for "
             f"the online methods; {a.eval_prompts} held-out prompts)", "",
             "| method | gold gain over SFT (± SEM) | win rate by gold | KL to SFT (nats/response) | "
             "learned reward SFT → policy | stop rate | critic's explained variance (last 10 iterations) | "
             "median step (s) | train wall time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r.get("explained_variance_last10")
        lines.append(f"| {r['method']} | {r['gold_gain']:+.3f} ± {r['gold_gain_sem']:.3f} | {r['win_rate_by_gold']:.3f} | "
                     f"{r['kl_to_sft']:.2f} | {r['reward_sft']:.3f} → {r['reward_policy']:.3f} | {r['stop_rate']:.2f} | "
                     f"{'—' if ev is None else f'{ev:.2f}'} | {r.get('step_s_median') or 0:.2f} | "
                     f"{r['train_s']:.0f} | {r['peak_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="quickstart", default="runs/quickstart", help="a finished quickstart output dir")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "po_methods"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="po_methods", help="the results files' name (NAME.json, NAME.md)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    rows = []
    for m in a.methods.split(","):
        r = subprocess.run([sys.executable, __file__, "--worker", "--method", m, "--from", a.quickstart,
                            "--iterations", str(a.iterations), "--eval-prompts", str(a.eval_prompts), "--work", a.work],
                           capture_output=True, text=True, cwd=ROOT, env={"WANDB_MODE": "disabled", **__import__("os").environ})
        if r.returncode != 0:
            print(f"{m} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1]))
        print(json.dumps(rows[-1]), flush=True)
    from benchmarks.common import load_average, write_results
    write_results(a.name, {"rows": rows, "args": vars(a), "load_average": {"end": load_average("end")}},
                  markdown(rows, a), Path(a.out))


if __name__ == "__main__":
    main()
