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
