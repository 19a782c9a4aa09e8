"""The pipeline's report: report.json, report.md and PNG plots in the pipeline's run dir."""
from __future__ import annotations

import json
from pathlib import Path

from align.demo.tasks import task_module_name
from align.rundir import RunDir


def _metrics(run_dir: Path) -> list[dict]:
    f = RunDir(run_dir).metrics
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln] if f.exists() else []


def _plot(out: Path, ppo_metrics: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    train = [m for m in ppo_metrics if "objective/scores" in m]
    evals = [m for m in ppo_metrics if "eval/reward" in m]
    if train:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [m["step"] for m in train]
        ax[0].plot(steps, [m["objective/scores"] for m in train], label="reward optimised (objective/scores)")
        if evals and "eval/gold" in evals[0]:
            ax[0].errorbar([m["step"] for m in evals], [m["eval/gold"] for m in evals],
                           yerr=[m.get("eval/gold_sem", 0) for m in evals], label="gold score (held-out)",
                           marker="o", capsize=2)
        ax[0].set_xlabel("iteration")
        ax[0].legend()
        ax[0].set_title("reward and gold score")
        ax[1].plot(steps, [m.get("objective/kl", float("nan")) for m in train], label="KL(policy || SFT), rollout")
        if evals:
            ax[1].plot([m["step"] for m in evals], [m["eval/kl"] for m in evals], "o-", label="held-out")
        ax[1].set_xlabel("iteration")
        ax[1].legend()
        ax[1].set_title("KL to the SFT policy (nats / sequence)")
        fig.tight_layout()
        fig.savefig(out / "ppo_curves.png", dpi=110)
        plt.close(fig)
        files.append("ppo_curves.png")
    return files


def _terms_rows(sft: dict | None, policy: dict | None, name: str) -> list[str]:
    """Rows of the gold's ingredients (when the task reports them), SFT → policy."""
    if not sft or not policy:
        return []
    return [f"| gold term {k.replace('_', ' ')}, SFT → {name} | {sft[k]:.3g} → {policy[k]:.3g} |" for k in sft]


def kl_label(controller: str, kl_coef: float, kl_target: float, stage: str = "ppo") -> str:
    """The report's KL row: what the number is, and the KL controller setting behind it. Only the
    adaptive controller has a target; the fixed one has a coefficient."""
    what = f"KL({stage.upper()} ‖ SFT), nats per response"
    if stage == "dpo":
        return f"{what} (DPO: β of the implicit reward)"
    if controller == "adaptive" and stage == "ppo":
        return f"{what} (adaptive controller target {kl_target:g}, initial β {kl_coef:g})"
    return f"{what} (fixed KL coefficient β {kl_coef:g})"


def _pm(r: dict | None) -> str:
    return "—" if not r or r.get("n", 0) == 0 else f"{r['mean']:.3f} ± {r['sem']:.3f}"


def verifier_lines(report: dict, name: str) -> list[str]:
    """The verifiers' table: pass rate (± SEM) per verifier and, where the evaluation broke them
    down (``by``), per group; sampled, greedy and over k samples; the in-context baselines beside."""
    va, vb = report.get("verifiers_sft") or {}, report.get("verifiers_policy") or {}
    if not vb:
        return []
    icl = report.get("in_context") or {}
    cols = [f"in-context {k}-shot" for k in icl] + ["SFT", name, f"{name} − SFT (paired)"]
    lines = ["## Verifiers (pass rate ± SEM on the held-out prompts)", "",
             "| verifier | decoding | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    diff = report.get("verifier_diff") or {}
    for vname in (vb.get("sampled") or vb.get("greedy") or {}):
        for view in [v for v in vb if v in ("sampled", "greedy")] + [v for v in vb if v.startswith("at_")]:
            measures = [("", lambda d: d)] if not view.startswith("at_") else \
                [("mean@", lambda d: d["mean_at_k"]), ("pass@", lambda d: d["pass_at_k"])]
            for prefix, pick in measures:
                label = view if not prefix else f"{prefix}{view[3:]}"
                groups = [None] + sorted(((vb[view][vname].get("by") or {}) if not prefix else {}))
                for g in groups:
                    def cell(v, view=view, g=g, pick=pick):
                        r = ((v or {}).get(view) or {}).get(vname)
                        if r is None:
                            return "—"
                        r = pick(r)
                        return _pm(r if g is None else (r.get("by") or {}).get(g))
                    row = [cell(icl[k].get("verifiers")) for k in icl] + [cell(va), cell(vb)]
                    row.append(_pm(diff.get(vname)) if view == "sampled" and g is None else "")
                    lines.append(f"| {vname}{'' if g is None else f' ({g})'} | {label} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def write_report(out: Path, cfg, comparison: dict, rm_acc: dict, seconds: dict, runs: dict) -> dict:
    out = Path(out)
    summaries = {k: RunDir(v).summary() for k, v in runs.items() if RunDir(v).summary_file.exists()}
    pol = cfg.policy
    stage = pol.stage
    name = stage.upper()
    ppo_metrics = _metrics(Path(runs["policy"])) if stage != "dpo" else []
    trainable = {"sft": summaries.get("sft", {}).get("trainable_params"),
                 "reward": summaries.get("reward", {}).get("trainable_params")}
    policy_trainable = summaries.get("policy", {}).get("trainable_params", {})
    trainable.update(policy_trainable if isinstance(policy_trainable, dict) else {"policy": policy_trainable})
    a, b = comparison["a"], comparison["b"]
    report = {
        "policy_stage": stage, "task": task_module_name(getattr(cfg, "task", "quickstart")),
        "quantization": getattr(cfg, "quantization", "none"),
        "rm_accuracy_vs_gold": rm_acc["rm_accuracy_vs_gold"],
        "rm_eval_pairs": rm_acc["rm_eval_pairs"],
        "rm_heldout_accuracy": summaries.get("reward", {}).get("eval/accuracy"),
        "gold_sft_mean": a.get("gold_mean"), "gold_sft_sem": a.get("gold_sem"),
        "gold_policy_mean": b.get("gold_mean"), "gold_policy_sem": b.get("gold_sem"),
        "gold_diff_mean": comparison.get("gold_diff_mean"), "gold_diff_sem": comparison.get("gold_diff_sem"),
        "reward_sft_mean": a["reward_mean"], "reward_policy_mean": b["reward_mean"],
        "win_rate_policy_by_gold": comparison.get("win_rate_b_by_gold"),
        "win_rate_policy_by_reward": comparison.get("win_rate_b_by_reward"),
        "n_eval_prompts": comparison["n_prompts"],
        "kl_to_sft_mean": b["kl_to_sft_mean"],
        "kl_target": pol.kl_target,
        "kl_controller": pol.kl_controller, "kl_coef": pol.kl_coef,
        "stop_rate_sft": a["stop_rate"], "stop_rate_policy": b["stop_rate"],
        "seconds_per_stage": {k: round(v, 1) for k, v in seconds.items()},
        "trainable_params": trainable,
        "backbone_params": summaries.get("sft", {}).get("backbone_params"),
        "runs": runs,
        "gold_terms_sft": a.get("gold_terms"), "gold_terms_policy": b.get("gold_terms"),
        "samples": comparison["samples"],
        "verifiers_sft": a.get("verifiers"), "verifiers_policy": b.get("verifiers"),
        "verifier_diff": comparison.get("verifier_diff"), "in_context": comparison.get("in_context"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plot(out, ppo_metrics)
    origin = f"{cfg.model}, frozen" if getattr(cfg, "model", "") else "pretrained from scratch, frozen"
    if report["quantization"] != "none":
        origin += f", Linear weights {report['quantization']} (bitsandbytes)"
    lines = [f"# align pipeline report ({report['task']}, {name})", "",
             f"Backbone: {report['backbone_params']:,} parameters ({origin}).", "",
             "| quantity | value |", "|---|---|",
             f"| reward-model accuracy vs gold (held-out SFT sample pairs, n={report['rm_eval_pairs']}) | "
             f"{report['rm_accuracy_vs_gold']:.3f} |",
             f"| gold score, SFT policy | {report['gold_sft_mean']:.3f} ± {report['gold_sft_sem']:.3f} |",
             f"| gold score, {name} policy | {report['gold_policy_mean']:.3f} ± {report['gold_policy_sem']:.3f} |",
             f"| gold improvement (paired) | {report['gold_diff_mean']:.3f} ± {report['gold_diff_sem']:.3f} |",
             f"| learned reward, SFT → {name} | {report['reward_sft_mean']:.3f} → {report['reward_policy_mean']:.3f} |",
             f"| {name} win rate vs SFT by gold / by RM | {report['win_rate_policy_by_gold']:.3f} / "
             f"{report['win_rate_policy_by_reward']:.3f} |",
             f"| {kl_label(pol.kl_controller, pol.kl_coef, pol.kl_target, stage)} | "
             f"{report['kl_to_sft_mean']:.3f} |",
             f"| stop-token rate SFT / {name} | {report['stop_rate_sft']:.2f} / {report['stop_rate_policy']:.2f} |",
             f"| held-out prompts | {report['n_eval_prompts']} |",
             *_terms_rows(report["gold_terms_sft"], report["gold_terms_policy"], name), "",
             "Trainable parameters per role: " + ", ".join(f"{k} {v:,}" for k, v in trainable.items() if v), "",
             "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds_per_stage"].items()), ""]
    lines += verifier_lines(report, name)
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += [f"## Samples (same prompt, SFT vs {name})", "", f"| prompt | SFT | {name} |", "|---|---|---|"]
    for s in comparison["samples"]:
        esc = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {esc(s['prompt'])} | {esc(s['a'])} | {esc(s['b'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
