"""Every stage under accelerate + DeepSpeed with 2 CPU processes (gloo), compared with one process
running the same global batch. Slow: each launch starts two interpreters (and, the first time on
a machine, JIT-builds DeepSpeed's shared-memory comm op)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[1]


def launch(preset: str, stage: str, *overrides: str):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{preset}.yaml"), "--num_processes", "2",
           "--main_process_port", "29517", "-m", "align.cli", stage, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def single(stage: str, *overrides: str):
    r = subprocess.run([sys.executable, "-m", "align.cli", stage, *overrides], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-4000:]


def losses(run_dir: Path, key="loss"):
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in x]


def same_tensors(a: Path, b: Path, atol: float):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from tests.test_sft import synthetic_instructions
    return synthetic_instructions(tmp_path_factory.mktemp("d") / "sft.jsonl", n=160)


def test_sft_zero2_two_processes_matches_one_process(tiny_llama, sft_data, tmp_path):
    """2 processes x batch 4 under ZeRO-2 == 1 process x batch 4 x 2 accumulation steps: the same
    micro-batches (micro-batch m goes to rank m % world), so losses and adapters agree, also when
    the ZeRO-2 run is killed after step 3 and resumed."""
    common = [f"model.path={tiny_llama}", f"data.train={sft_data}", "train.max_steps=6", "train.batch_size=4",
              "train.log_every=1", "tracking.wandb=false", "data.num_samples=0", "train.lr=5e-3"]
    launch("zero2", "sft", f"output_dir={tmp_path / 'ds'}", "train.stop_after_steps=3", "train.save_every=3", *common)
    launch("zero2", "sft", f"output_dir={tmp_path / 'ds'}", "resume=true", *common)  # killed at 3, resumed
    single("sft", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    assert (tmp_path / "ds" / "checkpoints" / "step_6" / "optimizer_rank1.pt").exists()  # really 2 ranks
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-5, rtol=1e-5)
    same_tensors(tmp_path / "ds/adapters/sft/adapter_model.safetensors",
                 tmp_path / "one/adapters/sft/adapter_model.safetensors", atol=1e-5)


def test_reward_zero2_two_processes_matches_one_process(tiny_llama, tmp_path):
    from tests.ppo_helpers import fake_sft_run
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    data = tmp_path / "prefs.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"the dog {i % 9}", "completions": [" happy song", " sad rain", " a dog"],
                                "ranks": [0, 2, 1]}) + "\n")
    common = [f"sft_run={sft}", f"data.train={data}", "data.eval_fraction=0.2", "train.max_steps=4",
              "train.batch_size=4", "train.log_every=1", "tracking.wandb=false", "normalize.source=none"]
    launch("zero2", "reward", f"output_dir={tmp_path / 'ds'}", *common)
    single("reward", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-5, rtol=1e-5)
    same_tensors(tmp_path / "ds/heads/reward/head.safetensors", tmp_path / "one/heads/reward/head.safetensors", 1e-5)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_ppo_two_processes_matches_one_process_and_resumes(preset, tiny_llama, tmp_path):
    """Killed after 2 iterations and resumed under ZeRO-2 or ZeRO-3 (where the rollout gathers the
    sharded weights): sampling is seeded per global row and rollouts are gathered, so 2 processes
    reproduce the 1-process run of the same batch."""
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 8)
    common = [f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
              "ppo.iterations=3", "ppo.rollout_batch_size=16", "ppo.micro_batch_size=4", "ppo.num_minibatches=2",
              "ppo.response_length=6", "eval.num_prompts=4", "tracking.wandb=false", "ppo.save_every=1"]
    launch(preset, "ppo", f"output_dir={tmp_path / 'ds'}", "ppo.stop_after_iterations=2", *common)
    launch(preset, "ppo", f"output_dir={tmp_path / 'ds'}", "resume=true", *common)
    single("ppo", f"output_dir={tmp_path / 'one'}", *common)
    for key in ("objective/scores", "objective/kl", "policy/loss"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds", key)),
                                   torch.tensor(losses(tmp_path / "one", key)), atol=1e-4, rtol=1e-4)
    same_tensors(tmp_path / "ds/adapters/policy/adapter_model.safetensors",
                 tmp_path / "one/adapters/policy/adapter_model.safetensors", atol=1e-4)
