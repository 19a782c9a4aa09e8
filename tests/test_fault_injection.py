"""Careless and hostile-but-realistic use: nothing a user had is lost, no non-finite tensor is saved,
every refusal is one clear line.

``align import --out``: an output never replaces what align import did not write or one of its own
inputs; a directory it wrote is replaced only with ``--overwrite``; files get the user's mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools import cli
from data_tools.canonical import read_records
from data_tools.outputs import MARKER

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(6)]


def _input(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def _import(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "align.cli", "import", "jsonl", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stderr


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_output_directory_holding_the_input_is_never_replaced(tmp_path):
    data = tmp_path / "mydata"
    inp = _input(data / "pairs.jsonl")
    (data / "notes.txt").write_text("mine\n")
    before = _tree(data)
    for extra in ([], ["--overwrite"]):
        rc, err = _import(str(inp), "--out", str(data), *extra)
        assert rc == 2 and "would overwrite the input" in err and len(err.strip().splitlines()) == 1, err
        assert _tree(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]      # no .mydata.old.* left behind


def test_out_dot_is_refused_and_changes_nothing(tmp_path):
    inp = _input(tmp_path / "elsewhere" / "pairs.jsonl")
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("keep\n")
    r = subprocess.run([sys.executable, "-m", "align.cli", "import", "jsonl", str(inp), "--out", ".", "--overwrite"],
                       cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "holds files align import did not write" in r.stderr, r.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "work"]


@pytest.mark.parametrize("split", [False, True])
def test_a_directory_align_import_wrote_is_replaced_only_with_overwrite(tmp_path, split):
    inp = _input(tmp_path / "pairs.jsonl")
    out = tmp_path / "ds"
    extra = ["--split", "train=0.5,test=0.5"] if split else []
    assert cli.main(["jsonl", str(inp), "--out", str(out), *extra]) == 0
    assert (out / MARKER).is_file()
    first = _tree(out)
    rc, err = _import(str(inp), "--out", str(out), *extra)
    assert rc == 2 and "holds an earlier import; pass --overwrite" in err
    assert _tree(out) == first
    assert cli.main(["jsonl", str(inp), "--out", str(out), *extra, "--overwrite"]) == 0
    assert (out / MARKER).is_file()
    records = [r for p in ([out / "train.jsonl", out / "test.jsonl"] if split else [out]) for r in read_records(p)]
    assert sorted(r["prompt"] for r in records) == [f"q{i}" for i in range(6)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary sibling left


def test_an_existing_file_is_replaced_only_with_overwrite_and_never_an_input(tmp_path):
    inp = _input(tmp_path / "pairs.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    rc, err = _import(str(inp), "--out", str(out))
    assert rc == 2 and "exists; pass --overwrite" in err and out.read_text() == "previous\n"
    assert cli.main(["jsonl", str(inp), "--out", str(out), "--overwrite"]) == 0
    assert len(read_records(out)) == 6
    original = inp.read_bytes()
    rc, err = _import(str(inp), "--out", str(inp), "--overwrite")
    assert rc == 2 and "would overwrite the input" in err and inp.read_bytes() == original


def test_outputs_get_the_users_file_mode(tmp_path):
    inp = _input(tmp_path / "pairs.jsonl")
    umask = os.umask(0o022)
    try:
        assert cli.main(["jsonl", str(inp), "--out", str(tmp_path / "o.jsonl"), "--on-error", "skip"]) == 0
        assert cli.main(["jsonl", str(inp), "--out", str(tmp_path / "ds")]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "o.rejects.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755


# ================================================================================= the stages
import signal  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tests.ppo_helpers as H  # noqa: E402
from align.config import ConfigError, load_config  # noqa: E402
from align.guard import NonFiniteError  # noqa: E402
from align.stages import dpo, grpo, reward, sft  # noqa: E402
from tests.test_sft import sft_cfg, synthetic_instructions  # noqa: E402


def _records(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _pairs(n=24, **extra):
    return [{"prompt": f"review {i}:", "chosen": " happy song", "rejected": " sad rain", **extra} for i in range(n)]


def _reward_cfg(tmp_path, sft_run, data, *extra, name="rm"):
    return load_config(reward.RewardConfig, None, [
        f"output_dir={tmp_path / name}", f"sft_run={sft_run}", f"data.train={data}", "data.eval_fraction=0.2",
        "train.batch_size=4", "train.max_steps=3", "tracking.wandb=false", "normalize.source=none", *extra])


BAD_RECORDS = [
    ({"margin": float("nan")}, "field 'margin' must be a finite number"),
    ({"weight": -1}, "field 'weight' must be a finite number >= 0"),
]


@pytest.mark.parametrize("extra,match", BAD_RECORDS)
def test_a_bad_numeric_field_is_refused_with_file_line_and_field_before_anything_is_written(
        extra, match, tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    recs = _pairs()
    recs[17] = {**recs[17], **extra}
    data = _records(tmp_path / "prefs.jsonl", recs)
    with pytest.raises(ValueError, match=rf"prefs.jsonl: line 18: {match}"):
        reward.run(_reward_cfg(tmp_path, sft_run, data))
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("rec,match", [
    ({"prompt": "p", "completions": [" a", " b"], "ranks": [0, 1.5]}, "field 'ranks' needs one integer"),
    ({"prompt": "p", "completions": [" a", " a"], "ranks": [0, 1]},
     "field 'completions': completions\\[1\\] repeats completions\\[0\\]"),
    ({"prompt": "p", "completions": [" a", " b"], "ranks": [0, 1], "scores": [1.0, float("inf")]},
     "field 'scores' needs one finite number"),
])
def test_rankings_the_importer_refuses_are_refused_by_the_stages_too(rec, match, tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    recs = [{"prompt": f"p{i}", "completions": [" a", " b"], "ranks": [0, 1]} for i in range(20)] + [rec]
    data = _records(tmp_path / "r.jsonl", recs)
    with pytest.raises(ValueError, match=rf"r.jsonl: line 21: {match}"):
        dpo.run(load_config(dpo.DPOConfig, None, [f"output_dir={tmp_path / 'd'}", f"sft_run={sft_run}",
                                                  f"data.train={data}", "tracking.wandb=false"]))
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("recs,match", [
    ([{"prompt": f"p{i}", "completions": [" a", " b"], "ranks": [1, 1]} for i in range(20)], "can teach anything"),
    ([{**r, "weight": 0} for r in _pairs()], "can teach anything"),
    ([], "holds no records"),
])
def test_data_that_teaches_nothing_is_refused(recs, match, tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    data = _records(tmp_path / "r.jsonl", recs)
    with pytest.raises(ConfigError, match=match):
        reward.run(_reward_cfg(tmp_path, sft_run, data, "data.eval_fraction=0"))
    assert not (tmp_path / "rm").exists()


def test_an_output_dir_that_is_a_file_is_refused_and_left_alone(tiny_llama, tmp_path):
    data = synthetic_instructions(tmp_path / "d.jsonl", n=40)
    f = tmp_path / "run"
    f.write_text("not a directory\n")
    with pytest.raises(ConfigError, match=r"output_dir .*run is a file; give a directory"):
        sft.run(sft_cfg(tmp_path, (tiny_llama, data)))
    assert f.read_text() == "not a directory\n"


def test_unreadable_files_give_one_line_naming_file_and_line(tmp_path):
    from align.data.common import read_records
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        read_records(bad)
    arr = tmp_path / "arr.json"
    arr.write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(ValueError, match=r"arr.json: record 2 of the JSON array is a int, not an object"):
        read_records(arr)
    yml = tmp_path / "bad.yaml"
    yml.write_text("train:\n  lr: [1, 2\n")
    r = subprocess.run([sys.executable, "-m", "align.cli", "sft", str(yml)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_record_error_after_the_prompt_split_names_its_line(tiny_llama, tmp_path):
    recs = [{"prompt": f"swap: {i} ->", "completion": f" {i}."} for i in range(40)]
    recs[30] = {"prompt": "swap: x ->"}                          # line 31: no completion
    data = _records(tmp_path / "s.jsonl", recs)
    with pytest.raises(ValueError, match=r"s.jsonl: line 31: "):
        sft.run(sft_cfg(tmp_path, (tiny_llama, data), "data.eval_fraction=0.2"))
    assert not (tmp_path / "run").exists()                      # refused before training: nothing left


def test_inputs_known_bad_leave_no_run_directory(tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    prompts = H.write_prompts(tmp_path / "p.jsonl", ["the dog"] * 16)
    base = [f"sft_run={sft_run}", f"data.prompts={prompts}", "tracking.wandb=false", "grpo.rollout_batch_size=8"]
    # a reward_fn that cannot take (prompts, responses, ended)
    with pytest.raises(ConfigError, match=r"reward_fn='tests.ppo_helpers:two_args': cannot be called as "
                                          r"fn\(prompts, responses, ended, \*\*columns\)"):
        grpo.run(load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path / 'g'}", *base,
                                                     "reward_fn=tests.ppo_helpers:two_args"]))
    assert not (tmp_path / "g").exists()
    # a reward run trained on another backbone
    other = tmp_path / "other"
    H.fake_reward_run(tiny_llama, other)
    rec = json.loads((other / "backbone.json").read_text())
    (other / "backbone.json").write_text(json.dumps({**rec, "fingerprint": "0" * 64}))
    with pytest.raises(ConfigError, match="was trained on another backbone"):
        grpo.run(load_config(grpo.GRPOConfig, None, [f"output_dir={tmp_path / 'g'}", *base, f"reward_run={other}"]))
    assert not (tmp_path / "g").exists()
    # an unloadable backbone: the run dir start_stage made is removed again
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    data = synthetic_instructions(tmp_path / "d.jsonl", n=40)
    with pytest.raises(Exception):
        sft.run(sft_cfg(tmp_path, (broken, data), name="s"))
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------ non-finite numbers
def test_a_nan_reward_stops_the_run_naming_the_step_and_keeps_the_good_checkpoints(tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    H.reset_calls()
    cfg = load_config(grpo.GRPOConfig, None, [
        f"output_dir={tmp_path / 'g'}", f"sft_run={sft_run}", f"data.prompts={prompts}", "tracking.wandb=false",
        f"data.eval_prompts={prompts}", "reward_fn=tests.ppo_helpers:nan_on_third_call", "grpo.iterations=5",
        "grpo.rollout_batch_size=8", "grpo.response_length=4", "grpo.save_every=1", "grpo.keep_checkpoints=2"])
    with pytest.raises(NonFiniteError, match=r"step 3: reward_fn tests.ppo_helpers:nan_on_third_call gave a "
                                             r"non-finite reward \(nan\) for response 1 of 8"):
        grpo.run(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "g" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_1", "step_2"]                        # nothing from step 3; nothing rotated away
    for c in ckpts:
        t = load_file(tmp_path / "g" / "checkpoints" / c / "trainable.safetensors")
        assert all(bool(torch.isfinite(v).all()) for v in t.values())
    with pytest.raises(NonFiniteError, match="returned 7 rewards for 8 responses"):
        grpo.run(load_config(grpo.GRPOConfig, None, [
            f"output_dir={tmp_path / 'g2'}", f"sft_run={sft_run}", f"data.prompts={prompts}", "tracking.wandb=false",
            f"data.eval_prompts={prompts}",
            "reward_fn=tests.ppo_helpers:one_short", "grpo.iterations=2", "grpo.rollout_batch_size=8",
            "grpo.response_length=4"]))


def test_a_non_finite_loss_stops_before_the_optimizer_step_and_writes_no_checkpoint(tiny_llama, tmp_path,
                                                                                     monkeypatch):
    calls = {"n": 0}
    real = sft.sft_loss

    def loss(model, batch):
        calls["n"] += 1
        value, stats = real(model, batch)
        return (value * float("inf") if calls["n"] == 3 else value), stats
    monkeypatch.setattr(sft, "sft_loss", loss)
    data = synthetic_instructions(tmp_path / "d.jsonl", n=120)
    with pytest.raises(NonFiniteError, match=r"\[sft\] step 3: the loss is inf .*no checkpoint written"):
        sft.run(sft_cfg(tmp_path, (tiny_llama, data), "train.max_steps=5", "train.save_every=1",
                        "train.eval_every=0"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_1", "step_2"]


# ------------------------------------------------------------------------------ resume
def _sft_pair(tiny_llama, tmp_path):
    data = synthetic_instructions(tmp_path / "d.jsonl", n=200)
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3", "train.eval_every=0",
              "train.log_every=1"]
    sft.run(sft_cfg(tmp_path, (tiny_llama, data), *common, name="full"))
    assert sft.run(sft_cfg(tmp_path, (tiny_llama, data), *common, "train.stop_after_steps=4", name="cut")) == \
        {"stopped_at": 4}
    return data, common


def _same_final(tmp_path, a="full", b="cut"):
    x = load_file(tmp_path / a / "adapters" / "sft" / "adapter_model.safetensors")
    y = load_file(tmp_path / b / "adapters" / "sft" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("damage", ["delete_newest", "truncate_trainable", "delete_state", "truncate_optimizer",
                                    "delete_rng", "truncate_rng_json", "edit_state"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_says_which(damage, tiny_llama, tmp_path, capsys):
    data, common = _sft_pair(tiny_llama, tmp_path)
    newest = tmp_path / "cut" / "checkpoints" / "step_4"
    if damage == "delete_newest":
        import shutil
        shutil.rmtree(newest)
    elif damage == "delete_state":
        (newest / "state.json").unlink()
    elif damage == "delete_rng":
        (newest / "rng_rank0.pt").unlink()
    elif damage == "truncate_rng_json":
        (newest / "rng_rank0.json").write_text((newest / "rng_rank0.json").read_text()[:10])
    elif damage == "edit_state":   # same length, other content: only the checksum can tell
        text = (newest / "state.json").read_text()
        (newest / "state.json").write_text(text.replace('"step": 4', '"step": 5'))
    else:
        f = newest / ("trainable.safetensors" if damage == "truncate_trainable" else "optimizer.pt")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    sft.run(sft_cfg(tmp_path, (tiny_llama, data), *common, "resume=true", name="cut"))
    out = capsys.readouterr().out
    assert "resuming from step_2; skipped step_4" in out, out
    _same_final(tmp_path)
    m = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                   for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert m("full") == m("cut")


def test_resume_refuses_when_no_checkpoint_verifies_and_changes_nothing(tiny_llama, tmp_path):
    data, common = _sft_pair(tiny_llama, tmp_path)
    for step in ("step_2", "step_4"):
        f = tmp_path / "cut" / "checkpoints" / step / "trainable.safetensors"
        f.write_bytes(b"\0" * f.stat().st_size)                   # same size, other bytes: the checksum
    before = (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"no checkpoint in .* verifies \(step_4: trainable.safetensors does not "
                                          r"match its checksum; step_2: .*nothing was changed"):
        sft.run(sft_cfg(tmp_path, (tiny_llama, data), *common, "resume=true", name="cut"))
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == before


def test_resume_of_a_finished_run_is_a_no_op(tiny_llama, tmp_path):
    data = synthetic_instructions(tmp_path / "d.jsonl", n=80)
    args = ["train.max_steps=2", "train.eval_every=0"]
    first = sft.run(sft_cfg(tmp_path, (tiny_llama, data), *args))
    before = {p: (tmp_path / "run" / p).read_bytes() for p in ("summary.json", "metrics.jsonl")}
    again = sft.run(sft_cfg(tmp_path, (tiny_llama, data), *args, "resume=true"))
    assert again["steps"] == first["steps"] == 2
    assert {p: (tmp_path / "run" / p).read_bytes() for p in before} == before


# ------------------------------------------------------------------------------ one run per directory
def _hold_lock(run_dir: Path):
    """Another process holding the run directory's lock, as a running align would."""
    code = ("import fcntl, os, socket, sys, time\n"
            f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()} {socket.gethostname()}'.encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tiny_llama, tmp_path):
    data = synthetic_instructions(tmp_path / "d.jsonl", n=80)
    args = ["train.max_steps=2", "train.eval_every=0", "train.save_every=1"]
    assert sft.run(sft_cfg(tmp_path, (tiny_llama, data), *args, "train.stop_after_steps=1")) == {"stopped_at": 1}
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"in use by another align run \(pid {holder.pid} on "):
            sft.run(sft_cfg(tmp_path, (tiny_llama, data), *args, "resume=true"))
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it (the file stays, naming a dead pid) and is taken over
    assert str(holder.pid) in (tmp_path / "run" / ".lock").read_text()
    assert sft.run(sft_cfg(tmp_path, (tiny_llama, data), *args, "resume=true"))["steps"] == 2


# ------------------------------------------------------------------------------ kill -9
def _cli(stage: str, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "align.cli", stage, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after(run_dir: Path, step: int, p: subprocess.Popen, timeout: float = 300) -> None:
    """SIGKILL ``p`` as soon as ``checkpoints/latest`` names a step >= ``step`` (wherever the run then
    is: training, or writing its next checkpoint)."""
    t0, latest = time.time(), run_dir / "checkpoints" / "latest"
    while True:
        try:
            if int(latest.read_text().strip()[5:]) >= step:
                break
        except (OSError, ValueError):
            pass
        assert p.poll() is None, "finished before it could be killed: " + p.stderr.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "rloo"])
def test_kill_9_then_resume_is_exact(stage, tiny_llama, tmp_path):
    sft_run = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    if stage == "sft":
        data = synthetic_instructions(tmp_path / "d.jsonl", n=400)
        args = [f"model.path={tiny_llama}", f"data.train={data}", "data.max_length=32", "train.batch_size=8",
                "train.max_steps=30", "train.save_every=1", "train.eval_every=0", "data.num_samples=0"]
        role = "sft"
    elif stage == "dpo":
        data = _records(tmp_path / "p.jsonl", [{"prompt": f"review {i}:", "chosen": " happy song",
                                                 "rejected": " sad rain"} for i in range(200)])
        args = [f"sft_run={sft_run}", f"data.train={data}", "train.batch_size=4", "train.max_steps=150",
                "train.save_every=1", "train.eval_every=0", "eval.kl_prompts=0"]
        role = "policy"
    else:
        prompts = H.write_prompts(tmp_path / "pr.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
        args = [f"sft_run={sft_run}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                "reward_fn=tests.ppo_helpers:count_target",
                "rloo.iterations=12", "rloo.rollout_batch_size=8", "rloo.response_length=4", "rloo.save_every=1",
                "eval.num_prompts=4"]
        role = "policy"
    args.append("tracking.wandb=false")
    full = _cli(stage, f"output_dir={tmp_path / 'full'}", *args)
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]
    killed = tmp_path / "killed"
    _kill_after(killed, 3, _cli(stage, f"output_dir={killed}", *args))
    resumed = _cli(stage, f"output_dir={killed}", "resume=true", *args)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    a = load_file(tmp_path / "full" / "adapters" / role / "adapter_model.safetensors")
    b = load_file(killed / "adapters" / role / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 160 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_every_checkpoint_whole(tiny_llama, tmp_path, tiny_filesystem):
    from align.checkpoint import verify_checkpoint
    data = synthetic_instructions(tmp_path / "d.jsonl", n=200)
    out = tiny_filesystem / "run"
    r = subprocess.run([sys.executable, "-m", "align.cli", "sft", f"output_dir={out}", f"model.path={tiny_llama}",
                        f"data.train={data}", "data.max_length=32", "train.batch_size=8", "train.max_steps=40",
                        "train.save_every=1", "train.keep_checkpoints=1000", "train.eval_every=0", "data.num_samples=0",
                        "tracking.wandb=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 1, r.stderr[-2000:]
    last = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("align sft:")]
    assert len(last) == 1 and "No space left on device" in last[0], r.stderr[-2000:]
    steps = list((out / "checkpoints").glob("step_*"))
    assert steps, "the disk filled before any checkpoint: make the filesystem larger"
    assert all(verify_checkpoint(s) is None for s in steps)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert verify_checkpoint(out / "checkpoints" / latest) is None
