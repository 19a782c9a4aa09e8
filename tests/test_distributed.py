"""Every stage under accelerate + DeepSpeed with 2 CPU processes (gloo), compared with one process
running the same global batch. Slow: each launch starts two interpreters (and, the first time on
a machine, JIT-builds DeepSpeed's shared-memory comm op)."""
from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("preset", ["zero2", "fsdp2"])
def test_reward_two_processes_matches_one_process(preset, tiny_llama, tmp_path):
    from tests.ppo_helpers import fake_sft_run
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    data = tmp_path / "prefs.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            # 16 prompts: with 9 the split by prompt hash held none out at 0.2, which is now refused
            f.write(json.dumps({"prompt": f"the dog {i % 16}", "completions": [" happy song", " sad rain", " a dog"],
                                "ranks": [0, 2, 1], "weight": [1.0, 3.0, 0.5, 2.0][i % 4]}) + "\n")
    common = [f"sft_run={sft}", f"data.train={data}", "data.eval_fraction=0.2", "train.max_steps=4",
              "train.batch_size=4", "train.log_every=1", "tracking.wandb=false", "normalize.source=none"]
    launch_bounded(preset, "reward", f"output_dir={tmp_path / 'ds'}", *common, timeout=300)
    single("reward", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    # the same global batch of 8 weighted groups in one micro-batch: weights count over the global batch
    single("reward", f"output_dir={tmp_path / 'whole'}", *[c for c in common if c != "train.batch_size=4"],
           "train.batch_size=8")
    for other in ("one", "whole"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds")), torch.tensor(losses(tmp_path / other)),
                                   atol=1e-5, rtol=1e-5)
        same_tensors(tmp_path / "ds/heads/reward/head.safetensors", tmp_path / f"{other}/heads/reward/head.safetensors",
                     1e-5)


@pytest.mark.parametrize("preset", ["zero2", "zero3", "fsdp2"])
def test_ppo_two_processes_matches_one_process_and_resumes(preset, tiny_llama, tmp_path):
    """Killed after 2 iterations and resumed under ZeRO-2, ZeRO-3 or FSDP2 (where the rollout
    gathers the sharded weights, and each process saves and restores its optimizer shard): sampling is seeded per global row and rollouts are gathered, so 2 processes
    reproduce the 1-process run of the same batch."""
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 8)
    common = [f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
              "ppo.iterations=3", "ppo.rollout_batch_size=16", "ppo.micro_batch_size=4", "ppo.num_minibatches=2",
              "ppo.response_length=6", "eval.num_prompts=4", "tracking.wandb=false", "ppo.save_every=1"]
    launch_bounded(preset, "ppo", f"output_dir={tmp_path / 'ds'}", "ppo.stop_after_iterations=2", *common,
                   timeout=400)
    launch_bounded(preset, "ppo", f"output_dir={tmp_path / 'ds'}", "resume=true", *common, timeout=400)
    single("ppo", f"output_dir={tmp_path / 'one'}", *common)
    for key in ("objective/scores", "objective/kl", "policy/loss"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds", key)),
                                   torch.tensor(losses(tmp_path / "one", key)), atol=1e-4, rtol=1e-4)
    same_tensors(tmp_path / "ds/adapters/policy/adapter_model.safetensors",
                 tmp_path / "one/adapters/policy/adapter_model.safetensors", atol=1e-4)


# ---------------------------------------------------------------- PPO minibatch splits (issue 17)
def launch_bounded(preset: str, stage: str, *overrides: str, timeout: int = 180, processes: int = 2,
                   launcher_args: tuple[str, ...] = (), env_extra: dict | None = None, module: str = "align.cli",
                   expect_failure: bool = False) -> str:
    """``launch`` (or ``python -m module stage *overrides``) on a free port, killed after ``timeout`` seconds, so a rank left waiting at a
    collective fails the test instead of blocking the suite. torchrun puts every worker in its own
    session, so the launcher's descendants are killed one by one (output goes to files: a pipe
    held open by a surviving worker would block the test too)."""
    import signal
    import socket
    import tempfile

    import psutil
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1", **(env_extra or {})}  # a crashing worker prints its stack
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{preset}.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(port), *launcher_args, "-m", module, stage, *overrides]
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGKILL)
            psutil.wait_procs(procs, timeout=30)
            out.seek(0)
            pytest.fail(f"{preset} {stage} did not finish in {timeout}s (a hang?)\n{out.read()[-5000:]}")
        out.seek(0)
        text = out.read()
        if expect_failure:
            assert p.returncode != 0, text[-3000:]
        else:
            assert p.returncode == 0, text[-8000:]
        return text


# rollout_batch_size, num_minibatches, micro_batch_size on 2 processes -> the 1-process micro_batch_size
# that cuts every minibatch into the same chunks (MinibatchSplit.chunk)
SPLITS = {
    "share_below_micro": (8, 2, 8, 2),   # 2 rows per rank < micro 8: before, rank 1 got nothing and hung
    "share_above_micro": (16, 2, 2, 2),  # 4 rows per rank in 2 chunks of 2
    "uneven": (20, 2, 4, 3),             # 5 rows per rank in chunks of 3 and 2 (1 process: 3, 3, 2, 2)
}


@pytest.fixture(scope="module")
def ppo_split_runs(tiny_llama, tmp_path_factory):
    """The SFT/reward runs and prompts, and each split's 1-process run (made once, for every preset)."""
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    root = tmp_path_factory.mktemp("ppo_split")
    sft, rm = fake_sft_run(tiny_llama, root / "sft"), fake_reward_run(tiny_llama, root / "rm")
    prompts = write_prompts(root / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 8)
    one: dict[str, Path] = {}

    def common(case: str, micro: int | None = None) -> list[str]:
        rollout, minibatches, micro2, _ = SPLITS[case]
        return [f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                "ppo.iterations=2", "ppo.num_ppo_epochs=2", f"ppo.rollout_batch_size={rollout}",
                f"ppo.num_minibatches={minibatches}", f"ppo.micro_batch_size={micro or micro2}",
                "ppo.response_length=4", "ppo.lr=1e-2", "eval.num_prompts=2", "tracking.wandb=false"]

    def one_process(case: str) -> Path:
        if case not in one:
            one[case] = root / f"one_{case}"
            single("ppo", f"output_dir={one[case]}", *common(case, SPLITS[case][3]))
        return one[case]
    return common, one_process


@pytest.mark.parametrize("case,preset", [(c, p) for c in SPLITS for p in ("ddp", "zero2")]
                         + [("share_below_micro", "zero3"), ("share_below_micro", "fsdp2")])
def test_ppo_minibatch_splits_two_processes_match_one_process(case, preset, ppo_split_runs, tmp_path):
    """Whatever each rank's share of a minibatch is next to ppo.micro_batch_size (below, above, not a
    multiple), both ranks make the same forward/backward calls per optimizer step: no hang, and the
    adapters equal the 1-process run that cuts the minibatches into the same chunks."""
    common, one_process = ppo_split_runs
    launch_bounded(preset, "ppo", f"output_dir={tmp_path / 'two'}", *common(case))
    one = one_process(case)
    for key in ("objective/scores", "policy/loss"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "two", key)), torch.tensor(losses(one, key)),
                                   atol=1e-4, rtol=1e-4)
    for sub in ("adapters/policy/adapter_model.safetensors", "adapters/value/adapter_model.safetensors"):
        same_tensors(tmp_path / "two" / sub, one / sub, atol=1e-4)


def test_ppo_with_the_critic_on_the_policys_trunk_two_processes_match_one_process(ppo_split_runs, tmp_path):
    """value.share_policy: one pass per chunk for the policy and value losses and the values read by
    the sampler, on 2 processes as on 1 (the policy's adapters and the value head)."""
    common, _ = ppo_split_runs
    case = "share_above_micro"
    launch_bounded("ddp", "ppo", f"output_dir={tmp_path / 'two'}", *common(case), "value.share_policy=true")
    single("ppo", f"output_dir={tmp_path / 'one'}", *common(case, SPLITS[case][3]), "value.share_policy=true")
    for key in ("objective/scores", "policy/loss", "value/loss"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "two", key)),
                                   torch.tensor(losses(tmp_path / "one", key)), atol=1e-4, rtol=1e-4)
    assert not (tmp_path / "one" / "adapters" / "value").exists()   # no adapters of its own
    for sub in ("adapters/policy/adapter_model.safetensors", "heads/value/head.safetensors"):
        same_tensors(tmp_path / "two" / sub, tmp_path / "one" / sub, atol=1e-4)


# ---------------------------------------------------------------- ZeRO-3 partitioning (issue 17 item 2)
@pytest.mark.parametrize("preset,method", [("zero3", "ia3"), ("zero3", "prefix"), ("zero3", "llama_adapter"),
                                           ("fsdp2", "ia3"), ("fsdp2", "prefix"), ("fsdp2", "llama_adapter"),
                                           ("fsdp2", "full")])
def test_sharded_backbone_trains_adapters_read_outside_their_own_modules(preset, method, tiny_llama, sft_data,
                                                                         tmp_path):
    """IA3 vectors, prefix embeddings and LLaMA-Adapter prompts and gates are read by backbone hooks
    and the attention function, not by calling their own module. ZeRO-3's module hooks never
    gathered them (their partitions are empty tensors): registered as external parameters of the
    model, they are whole in every forward and backward. Under FSDP2 they sit in the root group,
    whole for the whole forward; ``full`` trains the sharded weights of the layer groups
    themselves. 2 processes match 1."""
    common = [f"model.path={tiny_llama}", f"data.train={sft_data}", "train.max_steps=3", "train.batch_size=4",
              "train.log_every=1", "tracking.wandb=false", "data.num_samples=0", "train.lr=1e-2",
              f"adapter.method={method}"]
    launch_bounded(preset, "sft", f"output_dir={tmp_path / 'ds'}", *common, timeout=300)
    single("sft", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ds")), torch.tensor(losses(tmp_path / "one")),
                               atol=1e-5, rtol=1e-5)
    same_tensors(tmp_path / "ds/adapters/sft/adapter_model.safetensors",
                 tmp_path / "one/adapters/sft/adapter_model.safetensors", atol=1e-5)


def test_zero3_loads_the_backbone_partitioned_and_samples_it_layer_by_layer(tmp_path):
    """The zero3 preset builds the backbone under ``zero.Init`` (transformers reads the checkpoint
    on rank 0 and scatters it module by module), so each of N processes holds 1/N of it from the
    start; with ``model.zero3_gather_for_generation=false`` sampling fetches it module by module
    instead of gathering it whole. The same PPO iteration (rollout, update, evaluation) with 1
    process, 2 processes layer by layer and 2 processes gathering gives the same scores, losses
    and adapters, while the second process of 2 never holds the whole backbone: its peak resident
    memory is below the 1-process run's by at least a quarter of the backbone (measured: about
    half of it, plus the checkpoint pages only rank 0 reads), and below the gathering run's.
    As benchmarks/bench_zero3_memory.py runs it: DeepSpeed's residency limits scaled to this model,
    gradient checkpointing on, large allocations returned to the system when freed."""
    from align.demo.tiny import make_tiny
    from benchmarks.bench_zero3_memory import low_memory_zero3
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    backbone = make_tiny(tmp_path / "backbone", "llama", hidden=512, layers=8, heads=8, kv_heads=2,
                         intermediate=2048)
    sft, rm = fake_sft_run(backbone, tmp_path / "sft"), fake_reward_run(backbone, tmp_path / "rm")
    prompts = write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    common = [f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
              "ppo.iterations=1", "ppo.rollout_batch_size=8", "ppo.num_minibatches=2", "ppo.micro_batch_size=2",
              "ppo.response_length=6", "eval.num_prompts=4", "tracking.wandb=false", "model.gradient_checkpointing=true"]
    ds = low_memory_zero3(tmp_path / "zero3.json", 2e6)
    runs = {}
    for name, n, gather in (("one", 1, "false"), ("by_layer", 2, "false"), ("gather", 2, "true")):
        runs[name] = tmp_path / name
        launch_bounded("zero3", "ppo", f"output_dir={runs[name]}", f"model.zero3_gather_for_generation={gather}",
                       *common, timeout=420, processes=n, launcher_args=("--deepspeed_config_file", str(ds)),
                       env_extra={"MALLOC_MMAP_THRESHOLD_": "131072"})
    for name in ("by_layer", "gather"):
        for key in ("objective/scores", "objective/kl", "policy/loss", "eval/reward"):
            torch.testing.assert_close(torch.tensor(losses(runs[name], key)), torch.tensor(losses(runs["one"], key)),
                                       atol=1e-4, rtol=1e-4)
        same_tensors(runs[name] / "adapters/policy/adapter_model.safetensors",
                     runs["one"] / "adapters/policy/adapter_model.safetensors", atol=1e-4)
    mem = {k: {m["rank"]: m for m in json.loads((d / "summary.json").read_text())["memory"]} for k, d in runs.items()}
    whole = mem["one"][0]["backbone_mib"]
    assert whole > 100  # the backbone is large enough for its share to show in resident memory
    for name in ("by_layer", "gather"):
        assert sorted(mem[name]) == [0, 1]
        for rank in (0, 1):  # each process holds its half (ZeRO-3 pads a partition by at most a few elements)
            assert mem[name][rank]["backbone_mib"] == pytest.approx(whole / 2, rel=0.01)
    assert mem["by_layer"][1]["peak_rss_mib"] < mem["one"][0]["peak_rss_mib"] - whole / 4
    assert mem["by_layer"][1]["peak_rss_mib"] < mem["gather"][1]["peak_rss_mib"] - whole / 4


def test_zero3_partitioned_load_holds_the_same_weights_and_a_zero_pad_row(tmp_path):
    """Under the zero3 preset the backbone is built partitioned (``zero.Init``); align then adds a
    PAD of its own to a PAD == EOS checkpoint, which resizes the partitioned embeddings and zeroes
    the new rows under a gather. Gathered back whole, both processes hold exactly the weights of a
    plain single-process load, the added row is zero, and each process stored about half."""
    from align.backbone import load_backbone, load_tokenizer
    from align.demo.tiny import make_tiny
    from tests.test_real_tokenizers import _retokenize
    path = _retokenize(make_tiny(tmp_path / "padeos", "llama", kv_heads=2), pad_is_eos=True)
    tok = load_tokenizer(path)
    plain = load_backbone(path, tokenizer=tok)
    added = list(plain._align_masked_ids)
    assert added and plain.get_input_embeddings().num_embeddings == len(tok)  # align added a PAD row
    expected = {n: p.detach() for n, p in plain.named_parameters()}
    total = sum(t.numel() for t in expected.values())
    launch_bounded("zero3", str(path), str(tmp_path / "probe"), module="tests.zero3_probe", timeout=240)
    for rank in (0, 1):
        info = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())
        assert info["partitioned"] and info["added_ids"] == added
        assert info["fingerprint"] == plain._align_fingerprint
        assert sum(info["local_numel"].values()) == pytest.approx(total / 2, rel=0.01), info["local_numel"]
        got = load_file(str(tmp_path / "probe" / f"rank{rank}.safetensors"))
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            torch.testing.assert_close(got[name], t, atol=0, rtol=0, msg=name)
        emb = got["model.embed_tokens.weight"]
        assert emb.shape[0] == len(tok) and not emb[added].any()


# ---------------------------------------------------------------- FSDP2 (issue 17 item 6)
def test_sft_fsdp2_shards_the_backbone_matches_one_process_and_resumes(tiny_llama, sft_data, tmp_path):
    """Under FSDP2 each of 2 processes keeps half of the frozen backbone (one shard group per
    decoder layer, the rest and every adapter at the root); the same micro-batches as 1 process
    with 2 accumulation steps give the same losses and adapters, also when killed after step 3
    and resumed (each process's optimizer shard saved as plain tensors and put back)."""
    common = [f"model.path={tiny_llama}", f"data.train={sft_data}", "train.max_steps=6", "train.batch_size=4",
              "train.log_every=1", "tracking.wandb=false", "data.num_samples=0", "train.lr=5e-3",
              "train.max_grad_norm=0.05"]  # small enough to clip: the norm is taken over the shards
    two = tmp_path / "fsdp2"
    launch_bounded("fsdp2", "sft", f"output_dir={two}", "train.stop_after_steps=3", "train.save_every=3", *common,
                   timeout=300)
    opt = torch.load(two / "checkpoints/step_3/optimizer_rank1.pt", weights_only=True)
    assert opt["state"]  # plain tensors, readable with weights_only
    launch_bounded("fsdp2", "sft", f"output_dir={two}", "resume=true", *common, timeout=300)
    single("sft", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(tmp_path / "one")), atol=1e-5, rtol=1e-5)
    norms = losses(tmp_path / "one", "grad_norm")
    assert max(norms) > 0.05  # clipping was active
    torch.testing.assert_close(torch.tensor(losses(two, "grad_norm")), torch.tensor(norms), atol=1e-5, rtol=1e-4)
    same_tensors(two / "adapters/sft/adapter_model.safetensors",
                 tmp_path / "one/adapters/sft/adapter_model.safetensors", atol=1e-5)
    mem = {m["rank"]: m for m in json.loads((two / "summary.json").read_text())["memory"]}
    whole = json.loads((tmp_path / "one" / "summary.json").read_text())["memory"][0]["backbone_mib"]
    assert sorted(mem) == [0, 1]
    for rank in (0, 1):
        assert mem[rank]["backbone_mib"] == pytest.approx(whole / 2, rel=0.05)


def test_ppo_fsdp2_samples_group_by_group(ppo_split_runs, tmp_path):
    """With ``model.zero3_gather_for_generation=false`` FSDP2 gathers each layer's shards for each
    decoding step instead of the whole model for the loop; both processes step until every row of
    both has stopped. The same adapters as 1 process."""
    common, one_process = ppo_split_runs
    launch_bounded("fsdp2", "ppo", f"output_dir={tmp_path / 'two'}", "model.zero3_gather_for_generation=false",
                   *common("uneven"), timeout=300)
    one = one_process("uneven")
    for key in ("objective/scores", "policy/loss"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "two", key)), torch.tensor(losses(one, key)),
                                   atol=1e-4, rtol=1e-4)
    for sub in ("adapters/policy/adapter_model.safetensors", "adapters/value/adapter_model.safetensors"):
        same_tensors(tmp_path / "two" / sub, one / sub, atol=1e-4)


@pytest.mark.parametrize("preset,stage", [("fsdp2", "dpo"), ("fsdp2", "grpo"), ("zero3", "grpo")])
def test_sharded_dpo_and_grpo_two_processes_match_one_process(preset, stage, tiny_llama, tmp_path):
    """The other policy-optimisation stages on the same sharded roles: DPO (policy and its SFT
    reference, one trainer) and GRPO (rollout, no critic; each group's prompt runs once, and a
    rank whose chunk holds no shared prompt still makes the same collective passes)."""
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    from tests.test_reward import rule_rankings
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    if stage == "dpo":
        data = rule_rankings(tmp_path / "rules.jsonl", n=16)
        common = [f"sft_run={sft}", f"data.train={data}", "train.max_steps=4", "train.batch_size=4",
                  "train.log_every=1", "tracking.wandb=false", "train.lr=1e-2"]
        keys, accum = ("loss",), ["train.grad_accum=2"]
    else:
        rm = fake_reward_run(tiny_llama, tmp_path / "rm")
        prompts = write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
        common = [f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                  "grpo.iterations=2", "grpo.rollout_batch_size=8", "grpo.group_size=4", "grpo.micro_batch_size=2",
                  "grpo.num_minibatches=2", "grpo.response_length=5", "grpo.lr=1e-2", "eval.num_prompts=2",
                  "tracking.wandb=false"]
        keys, accum = ("objective/scores", "policy/loss"), []
    launch_bounded(preset, stage, f"output_dir={tmp_path / 'two'}", *common, timeout=300)
    single(stage, f"output_dir={tmp_path / 'one'}", *common, *accum)
    for key in keys:
        torch.testing.assert_close(torch.tensor(losses(tmp_path / "two", key)),
                                   torch.tensor(losses(tmp_path / "one", key)), atol=1e-4, rtol=1e-4)
    same_tensors(tmp_path / "two/adapters/policy/adapter_model.safetensors",
                 tmp_path / "one/adapters/policy/adapter_model.safetensors", atol=1e-4)


def test_fsdp2_gathered_sampling_needs_no_step_in_lockstep(tiny_llama, tmp_path):
    """Gathering for sampling (the default) makes the loop free of collectives: one process may
    stop after fewer forwards than another without a hang, both compute the same logits, and the
    backbone is sharded again after the loop."""
    launch_bounded("fsdp2", str(tiny_llama), str(tmp_path / "probe"), module="tests.fsdp2_probe", timeout=180)
    got = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(g["sharded_after"] for g in got)
    assert got[0]["logit0"] == got[1]["logit0"]


# ---------------------------------------------------------------- quantized backbone (issue 19)
@pytest.mark.parametrize("preset", ["ddp", "zero2"])
def test_sft_on_an_nf4_backbone_two_processes_matches_one_process(preset, tiny_llama, sft_data, tmp_path):
    """A quantized backbone is replicated, one per process, under the ddp and zero2 presets (the
    wrappers broadcast and move bitsandbytes' packed weights like any frozen tensor): 2 processes x
    batch 4 give the 1-process x 2-accumulation losses and LoRA."""
    pytest.importorskip("bitsandbytes")
    common = [f"model.path={tiny_llama}", f"data.train={sft_data}", "train.max_steps=4", "train.batch_size=4",
              "train.log_every=1", "tracking.wandb=false", "data.num_samples=0", "train.lr=5e-3",
              "model.quantization=nf4"]
    launch_bounded(preset, "sft", f"output_dir={tmp_path / 'two'}", *common, timeout=300)
    single("sft", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common)
    assert json.loads((tmp_path / "two" / "backbone.json").read_text())["quantization"] == "nf4"
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == 4 and two[-1] < two[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)
    same_tensors(tmp_path / "two/adapters/sft/adapter_model.safetensors",
                 tmp_path / "one/adapters/sft/adapter_model.safetensors", atol=1e-5)


@pytest.mark.parametrize("preset", ["zero3", "fsdp2"])
def test_a_quantized_backbone_is_refused_by_the_sharding_presets(preset, tiny_llama, sft_data, tmp_path):
    """ZeRO-3 and FSDP2 partition every parameter they are given; bitsandbytes' packed weights are
    only usable whole. Refused on every process, naming the setting and the presets that work,
    before the run directory is written (no hang, no half-made run)."""
    pytest.importorskip("bitsandbytes")
    out = launch_bounded(preset, "sft", f"output_dir={tmp_path / 'run'}", f"model.path={tiny_llama}",
                         f"data.train={sft_data}", "train.max_steps=2", "tracking.wandb=false",
                         "model.quantization=nf4", timeout=180, expect_failure=True)
    assert "model.quantization=nf4: a quantized backbone cannot be sharded" in out, out[-3000:]
    sharding = {"zero3": "DeepSpeed ZeRO stage 3", "fsdp2": "FSDP2 (the fsdp2 preset)"}[preset]
    assert f"launched with {sharding}" in out and "ddp or zero2" in out
    assert not (tmp_path / "run").exists()


def test_kill_9_of_a_two_process_run_then_resume_is_exact(tiny_llama, sft_data, tmp_path):
    """SIGKILL to every process of a 2-process ZeRO-2 SFT run as soon as its third checkpoint is named
    (mid-training or mid-save), then resume=true: the adapters equal an uninterrupted 2-process run's."""
    import signal
    import socket
    import time

    import psutil
    common = [f"model.path={tiny_llama}", f"data.train={sft_data}", "train.max_steps=14", "train.batch_size=4",
              "train.save_every=1", "train.eval_every=0", "tracking.wandb=false", "data.num_samples=0", "train.lr=5e-3"]
    launch_bounded("zero2", "sft", f"output_dir={tmp_path / 'full'}", *common, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "2",
                          "--main_process_port", str(port), "-m", "align.cli", "sft", f"output_dir={killed}", *common],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, latest = time.time(), killed / "checkpoints" / "latest"
    while True:
        try:
            if int(latest.read_text().strip()[5:]) >= 3:
                break
        except (OSError, ValueError):
            pass
        assert p.poll() is None and time.time() - t0 < 300, "finished or stuck before it could be killed"
        time.sleep(0.01)
    procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    launch_bounded("zero2", "sft", f"output_dir={killed}", "resume=true", *common, timeout=300)
    a = load_file(tmp_path / "full/adapters/sft/adapter_model.safetensors")
    b = load_file(killed / "adapters/sft/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_multi_process_command_leaves_with_its_output_flushed(tmp_path):
    """A rank that finished its run leaves with ``os._exit`` (gloo's native threads otherwise abort
    it now and then at interpreter exit, and the launcher calls the whole run failed): what it
    printed or logged but had not flushed still reaches the streams, and the exit code is the one
    given. Without the flush, buffered stdout written to a pipe is lost."""
    code = ("import logging, sys\n"
            "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
            "print('written but not flushed', end='')\n"
            "logging.getLogger('x').info('a log line')\n"
            "from align.distributed import exit_now\n"
            "exit_now(3)\n"
            "print('never')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3
    assert p.stdout == "written but not flushed"
    assert "a log line" in p.stderr
