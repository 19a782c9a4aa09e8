"""launch/*.sh: the printed accelerate command carries the preset, process counts and overrides,
and pipeline.sh chains the stage run dirs (dry runs: nothing is executed)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args, "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo", "grpo", "rloo"])
def test_stage_script_prints_the_accelerate_command(stage):
    r = dry(f"{stage}.sh", f"configs/{stage}.yaml", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--preset", "zero3_offload", "train.lr=1e-4")
    assert r.returncode == 0, r.stderr
    cmd = r.stderr.strip().splitlines()[-1]
    assert cmd.startswith("+ accelerate launch --config_file configs/accelerate/zero3_offload.yaml")
    for part in ("--num_processes 16", "--num_machines 2", "--machine_rank 1", "--main_process_ip 10.0.0.1",
                 f"-m align.cli {stage} configs/{stage}.yaml train.lr=1e-4"):
        assert part in cmd


def test_single_process_default_and_bad_preset():
    r = dry("sft.sh", "configs/sft.yaml")
    assert "configs/accelerate/single.yaml" in r.stderr and "--num_processes 1" in r.stderr
    r = dry("sft.sh", "configs/sft.yaml", "--preset", "zero4")
    assert r.returncode == 2 and "unknown preset 'zero4'" in r.stderr and "zero3_offload" in r.stderr


def test_pipeline_chains_the_stage_run_dirs():
    r = dry("pipeline.sh", "--out", "runs/x", "--nproc", "2", "sft:train.lr=3e-4", "ppo:ppo.iterations=5")
    assert r.returncode == 0, r.stderr
    sft, rm, ppo = [ln for ln in r.stderr.splitlines() if ln.startswith("+ ")]
    assert "zero2.yaml" in sft and "align.cli sft configs/sft.yaml output_dir=runs/x/sft" in sft
    assert sft.endswith("train.lr=3e-4")
    assert "align.cli reward configs/reward.yaml output_dir=runs/x/reward" in rm and "sft_run=runs/x/sft" in rm
    assert "reward_run=runs/x/reward" in ppo and ppo.endswith("ppo.iterations=5")
    r = dry("pipeline.sh", "train.lr=1")
    assert r.returncode == 2 and "must name its stage" in r.stderr


def test_the_suite_runs_its_longest_files_first_on_one_thread_per_worker():
    """launch/test.sh spreads files over xdist workers in the order tests/conftest.py gives them
    (longest first: xdist's own order put the one-test SmolLM2 pipeline last), and each worker runs
    one torch thread (two threads per worker on two cores ran past CI's 90 minutes)."""
    import os

    import torch

    from tests.conftest import LONGEST_FIRST, WORKERS
    script = (Path(__file__).resolve().parents[1] / "launch" / "test.sh").read_text()
    assert "--dist loadfile --no-loadscope-reorder" in script
    here = Path(__file__).resolve().parent
    assert [f for f in LONGEST_FIRST if not (here / f).is_file()] == []   # a renamed file would drop out silently
    if WORKERS > 1:
        threads = max(1, (os.cpu_count() or 1) // WORKERS)
        assert torch.get_num_threads() == threads and os.environ["OMP_NUM_THREADS"] == str(threads)
