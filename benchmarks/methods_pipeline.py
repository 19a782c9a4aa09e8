"""Every adapter method and the two finetuning baselines on a pipeline config's task and model
(the method table on SmolLM2 in docs/adapters.md): SFT and reward for every method, PPO for some.

    python benchmarks/methods_pipeline.py --config configs/smollm2.yaml --from runs/smollm2 \\
        --ppo-methods lora,bottleneck,prefix,full                # -> benchmarks/results/methods_smollm2.{json,md}

``--from`` is a pipeline output dir of that config; without ``data/rankings.jsonl`` there, the
pipeline's first steps (LoRA SFT, simulated annotation, import) run into it first.

Each method row is the pipeline itself (``align.demo.pipeline``'s SFT, reward and policy stages, with
the config's every setting) run with ``method=<method>`` in its own process, except:

* the rankings are ``FROM/data/rankings.jsonl``, the ones the pipeline imported from the simulated
  annotator's rankings of its **LoRA** SFT policy's samples: every reward model learns from the same
  comparisons (re-annotating per method would make the reward data differ between rows);
* learning rates: the config's (tuned for LoRA) times each method's factor relative to LoRA in
  ``compare_methods.LRS`` (chosen by SFT/reward trials on the quickstart task; not re-tuned on this
  model: the table says so);
* the reward model's accuracy against gold is measured on ``--rm-gold-prompts`` held-out prompts
  (K = the config's ``annotate.k`` SFT samples each), and PPO plus the SFT-vs-PPO evaluation run only
  for ``--ppo-methods``.

Peak RSS is each method process's own; seconds per step are medians over its ``metrics.jsonl``.
With ``--resume`` a finished row is kept and an unfinished one continues from the stages it has
(adding PPO later to a row that ran without it reuses its SFT and reward runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_methods import (LRS, METHODS, _f, comparison_fields, failed_row, machine,  # noqa: E402
                                        ppo_iteration_seconds, read_metrics, rss_mb, step_seconds, table_head)


def config_lrs(cfg) -> dict:
    """The (SFT, reward, policy) learning rates of a pipeline config, as a row records them."""
    return {"sft_lr": cfg.sft.lr, "reward_lr": cfg.reward.lr, "ppo_lr": cfg.policy.lr}


def scaled_lrs(cfg, method: str) -> dict:
    """The config's LoRA learning rates times the method's factor relative to LoRA's."""
    base = LRS["lora"]
    f = [x / b for x, b in zip(LRS[method], base)]
    return {"sft_lr": cfg.sft.lr * f[0], "reward_lr": cfg.reward.lr * f[1], "ppo_lr": cfg.policy.lr * f[2]}


def method_config(a, method: str, work: Path):
    from align.config import load_config
    from align.demo.pipeline import PipelineConfig
    cfg = load_config(PipelineConfig, a.config, a.overrides)
    lrs = scaled_lrs(cfg, method)
    cfg = dataclasses.replace(cfg, method=method, output_dir=str(work),
                              sft=dataclasses.replace(cfg.sft, lr=lrs["sft_lr"]),
                              reward=dataclasses.replace(cfg.reward, lr=lrs["reward_lr"]),
                              policy=dataclasses.replace(cfg.policy, lr=lrs["ppo_lr"]))
    cfg.tracking.wandb = False
    return cfg


def worker(a) -> dict:
    start_rss, load_start = rss_mb(), [round(x, 2) for x in os.getloadavg()]
    import torch
    from align.demo import pipeline as pl
    from align.evaluate import EvalConfig, compare, rm_accuracy_vs_gold
    m, work = a.method, Path(a.work_dir)
    # a finished stage in WORK is kept (the pipeline skips it; a killed one resumes): a later call
    # with this method in --ppo-methods adds PPO to the SFT and reward runs of an earlier one
    (work / "data").mkdir(parents=True, exist_ok=True)
    rankings = work / "data" / "rankings.jsonl"
    if not rankings.exists():
        shutil.copy(Path(a.src) / "data" / "rankings.jsonl", rankings)
    cfg = method_config(a, m, work)
    earlier = json.loads(Path(a.result).read_text()) if Path(a.result).exists() else {}
    wall: dict[str, float] = dict(earlier.get("seconds_per_stage", {}))

    def timed(name, fn, *args, run_dir: Path | None = None):
        done = run_dir is not None and pl._stage_done(run_dir)
        t = time.time()
        out = fn(*args)
        if not done:  # the seconds of the call that ran the stage
            wall[name] = time.time() - t
        return out

    backbone = pl._backbone(cfg, work)
    rm_kept = pl._stage_done(work / "reward") and "rm_accuracy_vs_gold" in earlier  # measured by an earlier call
    sft_dir = timed("sft", pl._sft, cfg, backbone, work, run_dir=work / "sft")
    rm_dir = timed("reward", pl._reward, cfg, sft_dir, rankings, work, run_dir=work / "reward")
    prompts, held = pl._prompt_files(cfg, work)
    ev = EvalConfig(sft_run=str(sft_dir), reward_run=str(rm_dir), policy_a="sft", policy_b="sft",
                    prompts=str(held), num_prompts=a.rm_gold_prompts, temperature=cfg.temperature, response_length=cfg.response_length,
                    gold=pl.gold_spec(cfg), seed=cfg.seed, chat=cfg.chat)
    if rm_kept:  # the same reward model and held-out samples: the earlier call's figure, not 2 min again
        acc = {"rm_accuracy_vs_gold": earlier["rm_accuracy_vs_gold"], "rm_eval_pairs": earlier["rm_gold_pairs"]}
    else:
        acc = timed("rm_vs_gold", rm_accuracy_vs_gold, ev, cfg.annotate.k)
    sft_sum, rm_sum = (json.loads((d / "summary.json").read_text()) for d in (sft_dir, rm_dir))
    sft_eval = [x for x in read_metrics(sft_dir) if "eval/loss" in x]
    row = {"method": m, "lrs": config_lrs(cfg),
           "backbone_params": sft_sum["backbone_params"],
           "trainable": {"sft": sft_sum["trainable_params"], "reward": rm_sum["trainable_params"]},
           "sft_step_s": step_seconds(read_metrics(sft_dir)), "reward_step_s": step_seconds(read_metrics(rm_dir)),
           "sft_eval_loss_start": sft_eval[0]["eval/loss"], "sft_eval_loss": sft_eval[-1]["eval/loss"],
           "rm_accuracy": rm_sum.get("eval/accuracy"), "rm_eval_pairs": rm_sum.get("eval/pairs"),
           "rm_accuracy_vs_gold": acc["rm_accuracy_vs_gold"], "rm_gold_pairs": acc["rm_eval_pairs"]}
    if a.ppo:
        policy_dir, held = timed("ppo", pl._policy, cfg, sft_dir, rm_dir, rankings, work, run_dir=work / "ppo")
        ppo_sum = json.loads((policy_dir / "summary.json").read_text())
        ev = dataclasses.replace(ev, policy_b=str(policy_dir), num_prompts=cfg.eval.prompts)
        cmp = timed("eval", compare, ev)
        row.update(comparison_fields(cmp), ppo_iteration_s=ppo_iteration_seconds(read_metrics(policy_dir)),
                   ppo_iterations=ppo_sum.get("iterations"))
        row["trainable"].update(policy=ppo_sum["trainable_params"]["policy"], value=ppo_sum["trainable_params"]["value"])
    return {**row, "peak_rss_mb": max(rss_mb(), earlier.get("peak_rss_mb", 0)), "rss_at_start_mb": start_rss, "seconds_per_stage": wall,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}


def markdown(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    n = ok[0]["backbone_params"] if ok else 0
    out = ["---", f"measured: {meta['date']}", f"machine: {meta['machine']}", "---",  # run history: front matter
           f"#### Methods on {meta['model']} ({meta['task']}; {n:,}-parameter frozen backbone; the pipeline's "
           f"settings)", "",
           *table_head(["method", "trainable (% of backbone)", "lr SFT / RM / PPO", "SFT s/step", "RM s/step",
                        "SFT held-out loss", "RM held-out acc.", "RM acc. vs gold", "gold PPO − SFT (paired)",
                        "KL to SFT", "wall (min)", "peak RSS (MiB)"])]
    for r in rows:
        if "error" in r:
            out.append(failed_row(r, 12))
            continue
        lr, t = r["lrs"], r["trainable"]["sft"]
        ppo = (f"{r['gold_diff']:+.3f} ± {r['gold_diff_sem']:.3f} | {_f(r['kl_ppo'], '.2f')}"
               if "gold_diff" in r else "– | –")
        out.append(f"| `{r['method']}` | {t:,} ({100 * t / r['backbone_params']:.2f}%) "
                   f"| {lr['sft_lr']:.2g} / {lr['reward_lr']:.2g} / {lr['ppo_lr']:.2g} "
                   f"| {_f(r['sft_step_s'], '.2f')} | {_f(r['reward_step_s'], '.2f')} "
                   f"| {r['sft_eval_loss_start']:.3f} → {r['sft_eval_loss']:.3f} | {_f(r['rm_accuracy'], '.3f')} "
                   f"| {_f(r['rm_accuracy_vs_gold'], '.3f')} | {ppo} | {sum(r['seconds_per_stage'].values()) / 60:.1f} "
                   f"| {r['peak_rss_mb']:,.0f} |")
    lora = next((r for r in ok if r["method"] == "lora"), None)
    out += ["", "Every row: the same backbone, SFT demonstrations, rankings (imported from the annotator's "
            "rankings of the pipeline's LoRA SFT samples) and held-out prompts; learning rates are the config's "
            "LoRA rates times each method's factor from the quickstart trials (`compare_methods.LRS`), not "
            "re-tuned on this model. RM accuracy vs gold: pairs of K SFT samples with different gold scores on "
            f"{meta['rm_gold_prompts']} held-out prompts"
            + (f" ({lora['rm_gold_pairs']} pairs for LoRA)" if lora else "") + "; gold PPO − SFT on "
            f"the config's held-out prompts, for the methods given PPO. Regenerate: `{meta['command']}`."]
    return "\n".join(out) + "\n"


def annotate_first(a) -> None:
    """The pipeline's first steps into ``--from`` (backbone, LoRA SFT, simulated annotation through
    the importer), which every method's reward model then learns from."""
    from align.demo import pipeline as pl
    from align.config import load_config
    cfg = load_config(pl.PipelineConfig, a.config, [*a.overrides, f"output_dir={a.src}"])
    cfg.tracking.wandb = False
    out = Path(a.src)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[methods_pipeline] no rankings in {out}: SFT (LoRA) and annotation first", file=sys.stderr, flush=True)
    backbone = pl._backbone(cfg, out)
    pl.annotate(cfg, backbone, pl._sft(cfg, backbone, out), out / "data")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"), help="a pipeline config")
    ap.add_argument("--from", dest="src", default="runs/smollm2",
                    help="that pipeline's output dir (its data/rankings.jsonl is every method's reward data)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ppo-methods", default="lora,bottleneck,prefix,full", help="methods that also get PPO + eval")
    ap.add_argument("--rm-gold-prompts", type=int, default=96)
    ap.add_argument("--name", default="methods_smollm2", help="results NAME.{md,json} and NAME/ per method")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "methods_pipeline"))
    ap.add_argument("--resume", action="store_true",
                    help="keep finished rows and stages: a method's row reruns only what is missing (e.g. PPO for a "
                         "method newly in --ppo-methods, on its earlier SFT and reward runs)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ppo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config")
    a = ap.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a), indent=2))
        return 0
    methods = [m for m in a.methods.split(",") if m]
    ppo = set(m for m in a.ppo_methods.split(",") if m)
    if unknown := [m for m in methods if m not in LRS]:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if not (Path(a.src) / "data" / "rankings.jsonl").exists():
        annotate_first(a)
    per, work = Path(a.out) / a.name, Path(a.work)
    per.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    from align.config import load_config
    from align.demo.pipeline import PipelineConfig
    from align.demo.tasks import task_module_name
    cfg = load_config(PipelineConfig, a.config, a.overrides)
    passed = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--resume"]
    command = "python benchmarks/methods_pipeline.py " + shlex.join(passed)
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rows = []
    for m in methods:
        f = per / f"{m}.json"
        kept = json.loads(f.read_text()) if a.resume and f.exists() else {}
        if kept and "error" not in kept and (m not in ppo or "gold_diff" in kept):
            rows.append(kept)
            continue
        log = work / f"{m}.log"
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--result", str(f), "--method", m,
                "--work-dir", str(work / m), "--config", a.config, "--from", a.src,
                "--rm-gold-prompts", str(a.rm_gold_prompts), *(["--ppo"] if m in ppo else []), *a.overrides]
        print(f"[methods_pipeline] {m}: running (log {log})", file=sys.stderr, flush=True)
        t = time.time()
        if not a.resume:  # every stage from scratch
            f.unlink(missing_ok=True)
            shutil.rmtree(work / m, ignore_errors=True)
        with open(log, "a") as lf:
            rc = subprocess.run(args, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if rc == 0 and f.exists():
            res = json.loads(f.read_text())
        else:
            tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
            res = {"method": m, "error": f"exit {rc}: {tail[-1] if tail else ''}", "log": str(log)}
        res["wall_s"] = time.time() - t
        f.write_text(json.dumps(res, indent=2))
        print(f"[methods_pipeline] {m}: {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
        rows.append(res)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": cfg.model or "pretrained tiny",
            "task": task_module_name(cfg.task), "rm_gold_prompts": a.rm_gold_prompts, "command": command}
    md = markdown(rows, meta)
    (Path(a.out) / f"{a.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (Path(a.out) / f"{a.name}.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
