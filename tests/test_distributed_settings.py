"""Issue 17 items 3-5, on CPU: the stage's max_grad_norm and model.dtype are what the DeepSpeed
engine uses (config-building as a pure function, plus one real 1-process engine read back through
the trainer); a checkpoint resumes only with the number of processes that wrote it; a rank that
cannot see the run directory (several nodes without a shared filesystem) gets a clear error."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.checkpoint import ResumeError, check_resumable, load_checkpoint, save_checkpoint
from align.distributed import Runtime, deepspeed_settings

ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> dict:
    return json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())


# ---------------------------------------------------------------- item 3: clipping and precision
@pytest.mark.parametrize("name", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
@pytest.mark.parametrize("dtype,bf16,fp16", [("float32", False, False), ("bfloat16", True, False),
                                             ("float16", False, True), ("bf16", True, False)])
@pytest.mark.parametrize("clip", [0.0, 0.5, 1.0])
def test_shipped_configs_follow_the_stage(name, dtype, bf16, fp16, clip):
    cfg = deepspeed_settings(shipped(name), dtype=dtype, max_grad_norm=clip)
    assert cfg["gradient_clipping"] == clip                      # 0 included: clipping off
    assert cfg["bf16"]["enabled"] is bf16 and cfg["fp16"]["enabled"] is fp16


def test_accelerate_filled_flags_are_judged_on_the_file_as_written():
    """accelerate fills "auto" from its own mixed_precision (here: bf16 off) before prepare; the
    declared (file) values decide whether that is a conflict, model.dtype what the engine gets."""
    filled = {**shipped("zero2"), "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    cfg = deepspeed_settings(filled, dtype="bfloat16", max_grad_norm=1.0, declared=shipped("zero2"))
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False


@pytest.mark.parametrize("dtype,key,value", [("float32", "bf16", True), ("bfloat16", "bf16", False),
                                             ("bfloat16", "fp16", True), ("float16", "fp16", "false")])
def test_a_hard_coded_conflicting_precision_is_refused(dtype, key, value):
    cfg = {**shipped("zero2"), key: {"enabled": value}}
    with pytest.raises(ValueError, match=rf"sets {key}\.enabled=.* but model\.dtype={dtype}.*\"auto\""):
        deepspeed_settings(cfg, dtype=dtype, max_grad_norm=1.0, source="my.json")


def test_hard_coded_matching_precision_and_clipping_are_accepted():
    cfg = {**shipped("zero3"), "bf16": {"enabled": True}, "gradient_clipping": 0.5}
    out = deepspeed_settings(cfg, dtype="bfloat16", max_grad_norm=0.5)
    assert out["bf16"]["enabled"] is True and out["gradient_clipping"] == 0.5


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_a_hard_coded_other_clipping_is_refused(clip):
    cfg = {**shipped("zero2"), "gradient_clipping": 1.0}
    with pytest.raises(ValueError, match=rf"my\.json sets gradient_clipping=1\.0 but the stage's max_grad_norm is {clip}"):
        deepspeed_settings(cfg, dtype="float32", max_grad_norm=clip, source="my.json")


def test_accelerate_mixed_precision_must_agree_with_model_dtype():
    with pytest.raises(ValueError, match=r"mixed_precision=bf16 but model\.dtype=float32"):
        deepspeed_settings(shipped("zero2"), dtype="float32", max_grad_norm=1.0, mixed_precision="bf16")
    cfg = deepspeed_settings(shipped("zero2"), dtype="bfloat16", max_grad_norm=1.0, mixed_precision="bf16")
    assert cfg["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="model.dtype='int8'"):
        deepspeed_settings(shipped("zero2"), dtype="int8", max_grad_norm=1.0)


def test_the_launch_environment_is_read_as_written(monkeypatch):
    """What accelerate launch exports: the DeepSpeed file and a gradient_clipping from the accelerate
    YAML (ACCELERATE_GRADIENT_CLIPPING), which counts as hard-coded."""
    from align.distributed import declared_deepspeed_config
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "configs" / "deepspeed" / "zero3.json"))
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    declared, source = declared_deepspeed_config()
    assert declared["gradient_clipping"] == 1.0 and declared["bf16"] == {"enabled": "auto"}
    assert source.endswith("zero3.json")
    with pytest.raises(ValueError, match=r"zero3\.json sets gradient_clipping=1\.0 but the stage's max_grad_norm is 0"):
        deepspeed_settings(shipped("zero3"), dtype="float32", max_grad_norm=0, declared=declared, source=source)
    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING")
    assert declared_deepspeed_config()[0] == shipped("zero3")


PROBE = r'''
import json, sys
from pathlib import Path
import torch
from align.config import TrainConfig
from align.distributed import Runtime
from align.trainer import Trainer

out, clip, dtype = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
seen = {}
prepare = Runtime.prepare
def spy(self, *a, **k):
    engine, opt = prepare(self, *a, **k)
    seen.update(clip=engine.gradient_clipping(), bf16=engine.bfloat16_enabled(), fp16=engine.fp16_enabled(),
                zero=engine.zero_optimization_stage())
    return engine, opt
Runtime.prepare = spy

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
    def trainable_parameters(self):
        return list(self.parameters())
    def forward(self, x):
        return self.lin(x)

class Log:
    def log(self, *a):
        pass

torch.manual_seed(0)
data = [torch.randn(4) for _ in range(8)]
Trainer("sft", out, TrainConfig(max_steps=1, batch_size=2, max_grad_norm=clip), Runtime(), M(), data,
        lambda b: {"x": torch.stack(b)}, lambda eng, b: (eng(b["x"]).pow(2).mean(), {}), Log(),
        dtype=dtype).run()
(out / "seen.json").write_text(json.dumps(seen))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_trainer_deepspeed_engine_uses_the_stage_clipping_and_dtype(clip, tmp_path):
    """A real DeepSpeed ZeRO-2 engine (1 gloo process), built by Trainer.run from
    configs/deepspeed/zero2.json: its gradient_clipping is train.max_grad_norm (0: off, where it
    used to be 1.0 always) and with model.dtype=float32 neither bf16 nor fp16 is on."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "OMP_NUM_THREADS": "1",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs" / "deepspeed" / "zero2.json"),
           "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    (tmp_path / "probe.py").write_text(PROBE)
    r = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "run"), str(clip), "float32"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    seen = json.loads((tmp_path / "run" / "seen.json").read_text())
    assert seen == {"clip": clip, "bf16": False, "fp16": False, "zero": 2}


# ---------------------------------------------------------------- item 4: resume across world sizes
def one_process_checkpoint(run_dir: Path) -> Path:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    return save_checkpoint(run_dir, 2, {"w": p.detach()}, opt, {"step": 2, "world_size": 1})


def test_resume_with_another_world_size_is_refused(tmp_path):
    ckpt = one_process_checkpoint(tmp_path)
    with pytest.raises(ResumeError) as e:
        load_checkpoint(ckpt, rank=1, world_size=2)
    msg = str(e.value)
    assert str(ckpt) in msg and "written by 1 process and this run has 2" in msg
    assert "resume with 1 process (e.g. --nproc 1)" in msg
    with pytest.raises(ResumeError, match="this run has 2"):
        load_checkpoint(ckpt, rank=0, world_size=2)          # rank 0 too: no rank goes on alone
    assert load_checkpoint(ckpt, rank=0, world_size=1)["state"]["step"] == 2


def test_world_size_of_an_old_checkpoint_comes_from_its_rank_files(tmp_path):
    ckpt = one_process_checkpoint(tmp_path)
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))  # written before world_size was recorded
    for r in (1, 2):
        (ckpt / f"rng_rank{r}.pt").write_bytes((ckpt / "rng_rank0.pt").read_bytes())
    with pytest.raises(ResumeError, match="written by 3 processes and this run has 2.*resume with 3 processes"):
        check_resumable(ckpt, 2)


class FakeRuntime:
    """What Trainer needs of a Runtime, as rank ``rank`` of ``world`` processes (no processes)."""
    def __init__(self, rank: int, world: int):
        self.rank, self.world_size, self.is_main = rank, world, rank == 0
        self.device = torch.device("cpu")

    def prepare(self, *a, **k):
        raise AssertionError("reached prepare: training would have started")

    def print(self, *a):
        pass


def test_trainer_refuses_the_resume_before_any_training(tmp_path):
    from align.config import TrainConfig
    from align.trainer import Trainer
    one_process_checkpoint(tmp_path)
    model = torch.nn.Linear(3, 1)
    model.trainable_parameters = lambda: list(model.parameters())
    tr = Trainer("sft", tmp_path, TrainConfig(max_steps=4, batch_size=1), FakeRuntime(1, 2), model,
                 list(range(8)), lambda b: b, lambda *a: None, tracker=None)
    with pytest.raises(ResumeError, match=f"cannot resume from {re.escape(str(tmp_path))}.*step_2.*written by 1 process"):
        tr.run(resume=True)


def test_stage_start_refuses_the_resume_before_writing(tmp_path, monkeypatch):
    """start_stage (every stage, PPO included) checks before it rewrites config.yaml or loads the model."""
    from align.config import ModelConfig, TrainConfig
    from align.stages import common
    one_process_checkpoint(tmp_path)
    (tmp_path / "config.yaml").write_text("kept: true\n")
    monkeypatch.setattr(common, "Runtime", lambda **k: FakeRuntime(0, 2))
    cfg = type("Cfg", (), {"output_dir": str(tmp_path), "resume": True, "train": TrainConfig(),
                           "model": ModelConfig()})()
    with pytest.raises(ResumeError, match="written by 1 process and this run has 2"):
        common.start_stage(cfg, "sft", str(tmp_path))
    assert (tmp_path / "config.yaml").read_text() == "kept: true\n"


# ---------------------------------------------------------------- item 5: several nodes
def fake_rank(rank: int, world: int, others, broadcast_token=None) -> Runtime:
    """Rank ``rank`` of ``world`` with no processes behind it: ``others(mine)`` is what gathering
    this rank's answer returns, ``broadcast_token`` what rank 0 broadcasts."""
    rt = Runtime.__new__(Runtime)
    rt.rank, rt.world_size, rt.is_main = rank, world, rank == 0
    rt.barrier = lambda: None
    rt._broadcast_object = lambda obj: obj if broadcast_token is None else broadcast_token
    rt.gather_objects = others
    return rt


def test_a_rank_that_cannot_see_the_run_dir_gets_a_shared_filesystem_error(tmp_path, monkeypatch):
    """Rank 1 on another node: the run dir rank 0 made is not there (no shared filesystem), or
    the node has its own stale copy of it."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    rt = fake_rank(1, 2, lambda mine: [True] + mine, broadcast_token="123-456")
    with pytest.raises(RuntimeError, match=r"process\(es\) \[1\] of 2 cannot see .*nowhere.*shared by all nodes"):
        rt.check_shared_dir(tmp_path / "nowhere")
    (tmp_path / ".align_shared_check_0").write_text("old-token")
    with pytest.raises(RuntimeError, match="shared by all nodes"):
        rt.check_shared_dir(tmp_path)
    (tmp_path / ".align_shared_check_0").write_text("123-456")   # what rank 0 wrote: shared
    rt.check_shared_dir(tmp_path)


def test_rank_zero_reports_the_ranks_that_cannot_see_it_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    rt = fake_rank(0, 3, lambda mine: mine + [False, False])
    with pytest.raises(RuntimeError, match=r"\[1, 2\] of 3 cannot see"):
        rt.check_shared_dir(tmp_path)
    fake_rank(0, 2, lambda mine: mine * 2).check_shared_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []                  # the probe is removed either way


def test_a_rank_that_cannot_see_the_checkpoint_dir_gets_a_clear_error(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match=r"rank 1 cannot see .*\.tmp_step_3.*shared by all nodes"):
        save_checkpoint(tmp_path, 3, {"w": p.detach()}, None, {"step": 3}, rank=1, is_main=False,
                        barrier=lambda: None)
    ckpt = one_process_checkpoint(tmp_path / "run")
    (ckpt / "rng_rank0.pt").unlink()
    with pytest.raises(ResumeError, match=r"rank 0 cannot find \['rng_rank0.pt'\].*shared by all nodes"):
        load_checkpoint(ckpt, rank=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_refuse_a_one_process_sft_checkpoint(tiny_llama, tmp_path):
    """End to end: SFT killed after 2 steps in 1 process, resumed by `accelerate launch` with 2
    ZeRO-2 processes: refused at stage start with the message, before any step."""
    pytest.importorskip("deepspeed")
    from tests.test_sft import synthetic_instructions
    data = synthetic_instructions(tmp_path / "sft.jsonl", n=32)
    common = [f"model.path={tiny_llama}", f"data.train={data}", "train.max_steps=4", "train.batch_size=4",
              "tracking.wandb=false", "data.num_samples=0", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "align.cli", "sft", "train.stop_after_steps=2", "train.save_every=2",
                        *common], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "2",
                        "--main_process_port", str(free_port()), "-m", "align.cli", "sft", "resume=true", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "written by 1 process and this run has 2" in out and "resume with 1 process" in out, out[-4000:]
    assert "step_2" in out and not (tmp_path / "run" / "checkpoints" / "step_4").exists()


# ---------------------------------------------------------------- FSDP2 settings (issue 17 item 6)
def test_fsdp2_settings_are_read_from_the_launch_environment():
    from align.fsdp import FSDPSettings, settings_from_env
    assert settings_from_env({}) is None
    assert settings_from_env({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "1"}) is None
    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert settings_from_env(base) == FSDPSettings()
    got = settings_from_env({**base, "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_OFFLOAD_PARAMS": "true",
                             "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, LlamaMLP"})
    assert got == FSDPSettings(reshard_after_forward=False, offload_params=True,
                               layer_classes=("LlamaDecoderLayer", "LlamaMLP"))


@pytest.mark.parametrize("extra,message", [
    ({"FSDP_VERSION": "1"}, "align runs FSDP2 only"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "model.gradient_checkpointing=true"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading"),
])
def test_fsdp_settings_align_does_not_run_are_refused(extra, message):
    from align.config import ConfigError
    from align.fsdp import settings_from_env
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", **extra})


@pytest.mark.parametrize("mixed,dtype,ok", [("no", "float32", True), ("bf16", "bfloat16", True),
                                            ("bf16", "float32", False), ("fp16", "bfloat16", False)])
def test_fsdp2_precision_is_model_dtype(mixed, dtype, ok):
    from align.config import ConfigError
    from align.fsdp import check_precision
    if ok:
        check_precision(mixed, dtype)
    else:
        with pytest.raises(ConfigError, match="model.dtype decides"):
            check_precision(mixed, dtype)


def test_fsdp2_layer_classes_must_exist(tiny_llama):
    from align.config import ConfigError
    from align.fsdp import FSDPSettings, shard_groups
    from tests.conftest import load
    model, _ = load(tiny_llama)
    groups = shard_groups(model, FSDPSettings())
    assert groups[-1] is model and len(groups) == model.arch.num_layers + 1
    assert [type(g).__name__ for g in shard_groups(model, FSDPSettings(layer_classes=("LlamaMLP",)))[:-1]] \
        == ["LlamaMLP"] * model.arch.num_layers
    with pytest.raises(ConfigError, match="LlamaDecoderLayer"):
        shard_groups(model, FSDPSettings(layer_classes=("GPT2Block",)))


@pytest.mark.parametrize("zero_stage,fsdp,named", [(3, None, "DeepSpeed ZeRO stage 3 (the zero3 / zero3_offload presets"),
                                                   (None, object(), "FSDP2 (the fsdp2 preset)"),
                                                   (2, None, None), (None, None, None)])
def test_the_quantized_sharding_refusal_names_what_the_run_was_launched_with(zero_stage, fsdp, named):
    """Any stage-3 launch (zero3, zero3_offload, a user's own stage-3 DeepSpeed config) and FSDP2 are
    refused for int8 / nf4 with the sharding named; replicating launches (ddp, zero2) pass."""
    from align.quantization import sharded_quantization_problem
    rt = type("Rt", (), {"zero_stage": zero_stage, "fsdp": fsdp})()
    for quantization in ("int8", "nf4"):
        problem = sharded_quantization_problem(quantization, rt)
        if named is None:
            assert problem is None
        else:
            assert f"model.quantization={quantization}: a quantized backbone cannot be sharded" in problem
            assert f"launched with {named}" in problem and "ddp or zero2" in problem
    assert sharded_quantization_problem("none", rt) is None


def test_a_finished_command_closes_its_process_group_and_a_failed_one_leaves_it(tmp_path, monkeypatch):
    """``align STAGE`` closes the process group (barrier, destroy) once the stage has finished, so
    no rank is torn down with gloo's threads still running at interpreter exit (an occasional
    SIGABRT after a finished run) and the program then leaves with ``exit_now`` (no native static
    destructors) -- ``main`` itself never ends the interpreter; on an error it does not wait at a
    barrier and returns its exit code."""
    import torch.distributed as dist

    import align.cli
    import align.distributed
    import align.stages.sft as sft
    from align.cli import main
    calls, exits = [], []
    monkeypatch.setattr(sft, "run", lambda cfg: calls.append(cfg.output_dir))
    monkeypatch.setattr(align.distributed, "exit_now", exits.append)
    monkeypatch.setattr(align.cli, "_closed_group", [])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["sft", f"output_dir={tmp_path / 'run'}"]) == 0
        assert calls == [str(tmp_path / "run")]
        assert not dist.is_initialized()
        assert exits == [] and align.cli._closed_group == ["sft"]
        monkeypatch.setattr(sys, "argv", ["align", "sft", f"output_dir={tmp_path / 'run'}"])
        monkeypatch.setattr(align.cli, "main", lambda: 0)
        with pytest.raises(SystemExit):   # the patched exit_now returns; the real one never does
            align.cli.entry()
        assert exits == [0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

    def fails(cfg):
        raise ValueError("a bad record")
    monkeypatch.setattr(sft, "run", fails)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:
        assert main(["sft", f"output_dir={tmp_path / 'run2'}"]) == 1
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
