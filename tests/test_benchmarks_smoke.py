"""The benchmark scripts run on the tiny config (align side only: CI has no TRL 1.12 environment and
no network). No timing is asserted: the numbers only have to be there and positive."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,keys", [
    ("bench_ppo.py", ["step_s", "rollout_s", "generate_s", "update_s", "gen_tokens_per_s", "peak_mb",
                      "trainable_policy"]),
    ("bench_sft.py", ["step_s", "peak_mb", "trainable"]),
    ("bench_reward.py", ["step_s", "peak_mb", "trainable"]),
])
def test_benchmark_runs_on_the_tiny_config(script, keys, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--size", "tiny", "--side", "align",
                        "--reps", "1", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name = script[len("bench_"):-len(".py")]
    name = f"{name}_tiny_cpu" + ("_mb16_gcoff" if name == "ppo" else "_gcon")
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    med = payload["results"]["align"]["median"]
    for k in keys:
        assert med[k] > 0, (k, med)
    assert "| metric | align | TRL | align / TRL |" in (tmp_path / f"{name}.md").read_text()


def _trl_at_least(version: tuple[int, int]) -> bool:
    """Whether this interpreter has a trl of at least ``version`` (read from its metadata: no import)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        major, minor = (int(x) for x in installed("trl").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= version


def test_bench_po_trl_runs_dpo_grpo_rloo_on_the_tiny_config(tmp_path):
    """bench_po.py: both sides when this interpreter has trl >= 1.16 (its TRL side is this interpreter's
    trl), else align's side alone. Every method's numbers are there and positive, and with TRL every
    align / TRL ratio is a positive finite number and both sides train the same LoRA (same size)."""
    import math
    side = "both" if _trl_at_least((1, 16)) else "align"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_po.py"), "--size", "tiny", "--side", side,
                        "--reps", "1", "--warmup", "1", "--steps", "1", "--threads", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads((tmp_path / "po_trl_tiny_cpu.json").read_text())
    md = (tmp_path / "po_trl_tiny_cpu.md").read_text()
    assert list(payload["results"]) == ["dpo", "grpo", "rloo"]
    for method, res in payload["results"].items():
        med = res["align"]["median"]
        for k in ("step_s", "peak_mb", "trainable", "steps_timed"):
            assert med[k] > 0, (method, k, med)
        if method != "dpo":
            assert 0 < med["response_tokens"] <= 32 and med["rollout_s"] > 0 and med["update_s"] > 0, med
        assert f"#### {method.upper()} step" in md
        if side == "both":
            trl = res["trl"]["median"]
            assert trl["step_s"] > 0 and trl["peak_mb"] > 0 and trl["steps_timed"] == 1, trl
            assert trl["trainable"] == med["trainable"], (method, trl["trainable"], med["trainable"])
            assert set(res["ratio"]) == {"step_s", "peak_mb"}
            for k, v in res["ratio"].items():
                assert math.isfinite(v) and v > 0, (method, k, v)
            assert f"| {method.upper()} |" in md  # the summary's row
    assert "| metric | align | TRL | align / TRL |" in md


@pytest.mark.skipif(not _trl_at_least((1, 16)), reason="the TRL side needs trl >= 1.16")
def test_bench_po_grpo_loss_sets_the_same_loss_on_both_sides(tmp_path):
    """--grpo-loss gspo: align's GRPO runs the DAPO loss with clip-higher and one ratio per response, and
    TRL's GRPOTrainer the same under its names (each worker reports the settings its trainer ran with); the
    results file is named after the loss and its title says it."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_po.py"), "--size", "tiny", "--methods", "grpo",
                        "--grpo-loss", "gspo", "--reps", "1", "--warmup", "0", "--steps", "1", "--threads", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "po_trl_tiny_cpu_gspo.json").read_text())["results"]["grpo"]
    assert res["align"]["runs"][0]["loss"] == {"loss_type": "dapo", "cliprange_high": 0.28, "ratio_level": "sequence"}
    assert res["trl"]["runs"][0]["loss"] == {"loss_type": "dapo", "epsilon_high": 0.28,
                                             "importance_sampling_level": "sequence"}
    assert "#### GRPO (gspo loss) step" in (tmp_path / "po_trl_tiny_cpu_gspo.md").read_text()


def _quickstart_like_data(d: Path) -> Path:
    """The four files compare_methods reads, from the quickstart task's generators (small)."""
    from align.demo.tasks import quickstart as task
    d.mkdir(parents=True)
    demos = task.sft_demonstrations(64)
    rows = {"sft": demos, "ppo_prompts": [{"prompt": p} for p in task.prompts("ppo", 16)],
            "eval_prompts": [{"prompt": p} for p in task.prompts("eval", 8)], "rankings": []}
    for i in range(0, 48, 3):  # three demonstrations' answers to one prompt, ranked by the gold score
        comps = [x["completion"] for x in demos[i:i + 3]]
        gold = task.gold_scores([demos[i]["prompt"]] * 3, comps, [True] * 3)
        order = sorted(range(3), key=lambda j: -gold[j])
        rows["rankings"].append({"prompt": demos[i]["prompt"], "completions": comps,
                                 "ranks": [order.index(j) for j in range(3)]})
    for name, recs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_compare_methods_and_its_ppo_lr_sweep_run_on_a_tiny_model(tiny_llama, tmp_path):
    data = _quickstart_like_data(tmp_path / "data")
    base = [sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--backbone", str(tiny_llama),
            "--data", str(data), "--methods", "lora", "--ppo-iterations", "2", "--rollout-batch-size", "8",
            "--eval-prompts", "8", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--threads", "1"]
    r = subprocess.run(base + ["--sft-steps", "4", "--reward-steps", "2", "--normalize-prompts", "8", "--no-rm-gold"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "methods" / "lora.json").read_text())
    assert row["sft_steps"] == 4 and row["reward_steps"] == 2 and row["ppo_iterations"] == 2
    assert row["n_eval_prompts"] == 8 and row["ppo_iteration_s"] > 0
    assert "| `lora` |" in (tmp_path / "out" / "methods.md").read_text()

    r = subprocess.run(base + ["--ppo-lrs", "3e-3,1e-2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((tmp_path / "out" / "methods_ppo_lr.json").read_text())["rows"]
    # the full run's row (lr 3e-3, LoRA's) and one PPO-only rerun at 1e-2 from the same SFT/reward runs
    assert [(x["method"], x["ppo_lr"], x["rm"]) for x in sweep] == [("lora", 3e-3, "lora"), ("lora", 1e-2, "lora")]
    assert sweep[0]["gold_sft"] == sweep[1]["gold_sft"]  # the same SFT policy on the same prompts and seed
    assert all(isinstance(x["value_ev_last10"], float) for x in sweep)  # the critic's fit, from each run's metrics
    assert sweep[1]["ppo_iterations"] == 2 and (tmp_path / "work" / "lora" / "ppo_lr0.01" / "config.yaml").exists()
    md = (tmp_path / "out" / "methods_ppo_lr.md").read_text()
    assert "| `lora` | 0.003 (table) | `lora` |" in md and "| `lora` | 0.01 | `lora` |" in md


def test_methods_pipeline_annotates_once_then_runs_every_method_on_the_same_rankings(tiny_llama, tmp_path):
    """benchmarks/methods_pipeline.py (the method table on a pipeline config): with no rankings in
    --from it runs the pipeline's LoRA SFT and annotation there first; then each method runs the
    pipeline's SFT and reward (PPO only for --ppo-methods) on those same rankings, at the config's
    learning rates times the method's factor."""
    over = [f"model={tiny_llama}", "sft.steps=4", "sft.examples=64", "annotate.prompts=16", "reward.epochs=1",
            "policy.iterations=1", "policy.prompts=32", "policy.rollout_batch_size=8", "policy.micro_batch_size=4",
            "eval.prompts=8"]
    src, out, work = tmp_path / "src", tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods_pipeline.py"), "--config",
                        str(ROOT / "configs" / "quickstart.yaml"), "--from", str(src), "--methods", "lora,ia3",
                        "--ppo-methods", "lora", "--rm-gold-prompts", "8", "--name", "m", "--out", str(out),
                        "--work", str(work), *over], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rankings = (src / "data" / "rankings.jsonl").read_text()
    assert rankings and (src / "sft" / "summary.json").exists()
    lora, ia3 = (json.loads((out / "m" / f"{m}.json").read_text()) for m in ("lora", "ia3"))
    for row, m in ((lora, "lora"), (ia3, "ia3")):
        assert (work / m / "data" / "rankings.jsonl").read_text() == rankings
        assert row["rm_gold_pairs"] > 0 and 0 <= row["rm_accuracy_vs_gold"] <= 1
        assert row["sft_eval_loss"] < row["sft_eval_loss_start"] + 1 and row["trainable"]["sft"] > 0
    assert lora["ppo_iterations"] == 1 and lora["n_eval_prompts"] == 8 and "kl_ppo" in lora
    assert "gold_diff" not in ia3 and not (work / "ia3" / "ppo").exists()
    assert ia3["lrs"]["sft_lr"] == pytest.approx(50 * lora["lrs"]["sft_lr"])  # compare_methods.LRS: 1e-1 / 2e-3
    assert ia3["trainable"]["sft"] < lora["trainable"]["sft"]
    md = (out / "m.md").read_text()
    assert "| `lora` |" in md and "| `ia3` |" in md and "– | –" in md

    # --resume adds PPO to ia3's row on its earlier SFT and reward runs (not rerun) and keeps lora's
    sft_adapter = work / "ia3" / "sft" / "adapters" / "sft" / "adapter_model.safetensors"
    stamp = sft_adapter.stat().st_mtime_ns
    r = subprocess.run([*r.args[:r.args.index("--ppo-methods")], "--ppo-methods", "lora,ia3",
                        *r.args[r.args.index("--ppo-methods") + 2:], "--resume"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ia3_again = json.loads((out / "m" / "ia3.json").read_text())
    assert ia3_again["ppo_iterations"] == 1 and "gold_diff" in ia3_again and sft_adapter.stat().st_mtime_ns == stamp
    assert ia3_again["seconds_per_stage"]["sft"] == ia3["seconds_per_stage"]["sft"]
    assert json.loads((out / "m" / "lora.json").read_text()) == lora


def test_bench_quant_memory_runs_align_in_float_and_nf4_on_the_tiny_config(tmp_path):
    """bench_quant_memory.py, align's side (CI has no TRL 1.12 environment): every mode's peak memory
    (resident, and anonymous including the load), step time and weight bytes are there, and the nf4
    backbone's weights are smaller than float32's."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quant_memory.py"), "--size", "tiny",
                        "--sides", "align", "--modes", "none,nf4", "--warmup", "1", "--steps", "1",
                        "--batch", "4", "--micro-batch", "4", "--response-length", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads((tmp_path / "quant_memory_tiny_cpu.json").read_text())
    med = payload["medians"]["align"]
    for mode in ("none", "nf4"):
        for k in ("step_s", "steps_peak_mb", "peak_mb", "anon_peak_mb", "weights_mb"):
            assert med[mode][k] > 0, (mode, k, med[mode])
        assert med[mode]["steps_peak_mb"] <= med[mode]["peak_mb"] + 1, med[mode]
        # the process's own memory (RssAnon) is part of its resident set, whose peak is VmHWM
        assert med[mode]["anon_peak_mb"] <= med[mode]["peak_mb"] + 1, med[mode]
    assert med["nf4"]["weights_mb"] < med["none"]["weights_mb"], med
    assert "| nf4 |" in (tmp_path / "quant_memory_tiny_cpu.md").read_text()


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_memory_phases_profiles_a_step_by_phase_on_the_tiny_config(tmp_path, method):
    """memory_phases.py: both sides when this interpreter has trl >= 1.16, else align's alone; every
    side reports its imports alone, the process peak and, per phase, an entry level and a peak no
    lower than it, with the step's phases (forward, backward, optimizer step) among them."""
    side = "both" if _trl_at_least((1, 16)) else "align"
    extra = ["--batch", "4", "--group-size", "2", "--micro-batch", "4", "--response-length", "4"] \
        if method == "grpo" else ["--dpo-batch", "2"]
    steps = ["--warmup", "0", "--steps", "1"] if method == "grpo" else ["--warmup", "1", "--steps", "1"]  # DPO times a step by the one before
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_phases.py"), "--size", "tiny", "--method",
                        method, "--side", side, *steps, "--threads", "1", *extra,
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name = f"memory_phases_tiny_{method}"
    results = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    assert list(results) == (["align", "trl"] if side == "both" else ["align"])
    for s, res in results.items():
        phases = {p["phase"]: p for p in res["phases"]}
        want = {"run", "loss forward", "backward", "optimizer step"} | ({"sample", "score"} if method == "grpo" else set())
        assert want <= set(phases), (s, sorted(phases))
        assert 0 < res["imports_mb"] <= res["ru_maxrss_mb"]
        for p in res["phases"]:
            assert p["peak_mb"] >= p["entry_mb"] > 0 and 0 < p["anon_at_peak_mb"] <= p["peak_mb"], (s, p)
    assert "| phase | at first entry | peak inside | rise | anonymous at the peak |" in (tmp_path / f"{name}.md").read_text()
