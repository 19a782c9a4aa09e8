"""The run-directory layout, named in one place (align/rundir.py): what an online run records of
its roles is enough to find every adapter set and head again, and run dirs written before
roles.json held every role (reward_role.json, policy_role.json) still load."""
from __future__ import annotations

import json

import pytest
import torch

import align.stages.ppo as ppo
import tests.ppo_helpers as H
from align.config import run_dir_problems
from align.rundir import RunDir
from align.scoring import load_reward_role
from align.stages.online import roles_record
from tests.conftest import load
from tests.test_ppo import ppo_cfg


@pytest.mark.parametrize("value", ["value.init=reward", "value.share_policy=true"])
def test_an_online_runs_roles_record_names_every_set_and_head_where_it_lies(tiny_llama, tmp_path, value):
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm", mean=0.5, std=2.0)
    cfg = ppo_cfg(tmp_path, sft, tmp_path / "none.jsonl", f"reward_run={rm}", value)
    model, _ = load(tiny_llama)
    ppo.build_roles(model, cfg)
    run = RunDir(tmp_path / "ppo")
    for n in ("policy", "value"):   # what save_final writes
        if n in model.adapters:
            run.adapter(n).mkdir(parents=True)
    run.head("value").mkdir(parents=True)
    rec = roles_record(model, run, str(sft), str(rm), ("policy", "value"))
    assert set(rec) == {"reference", "policy", "value", "reward"}
    for role, entry in rec.items():
        assert [e["name"] for e in entry["adapters"]] == list(model.roles[role].adapters)
        for e in entry["adapters"]:
            assert run.resolve(e["dir"]).is_dir(), (role, e)
        if "head" in entry:
            assert run.resolve(entry["head"]).is_dir(), (role, entry["head"])
    assert rec["reference"]["adapters"] == [{"name": "sft", "dir": str((sft / "adapters" / "sft").resolve())}]
    assert rec["policy"]["adapters"] == [{"name": "policy", "dir": "adapters/policy"}]
    assert rec["reward"]["head"] == str((rm / "heads" / "reward").resolve())
    assert rec["value"]["head"] == "heads/value"
    json.dumps(rec)   # the record is plain JSON


def test_a_reward_run_from_before_roles_json_still_loads(tiny_llama, tmp_path):
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm", mean=0.7, std=2.5)
    role = json.loads((rm / "roles.json").read_text())["reward"]
    (rm / "roles.json").unlink()
    (rm / "reward_role.json").write_text(json.dumps(role))
    assert run_dir_problems(str(rm), "reward_run", "reward") == []
    assert RunDir(rm).role("reward") == role
    model, tok = load(tiny_llama)
    stack, norm = load_reward_role(model, rm)
    assert stack == ["reward"] and norm["mean"] == pytest.approx(0.7)
    ids = torch.tensor([tok("the happy dog").input_ids])
    assert torch.isfinite(model(ids, role="reward").values).all()
    (rm / "reward_role.json").unlink()
    problems = run_dir_problems(str(rm), "reward_run", "reward")
    assert problems and "has no reward role (roles.json)" in problems[0]
