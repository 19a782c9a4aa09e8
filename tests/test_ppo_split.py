"""How PPO spreads every minibatch over processes and micro-batches (align.stages.online.MinibatchSplit):
every rank gets an equal share in the same number of forward/backward calls, whatever the world
size and micro-batch size, and a config that cannot be split evenly is refused before any work."""
from __future__ import annotations

import json

import pytest
import torch

import align.stages.online as online
import align.stages.ppo as ppo
from align.config import ConfigError, load_config


def algo(rollout: int, minibatches: int, micro: int) -> ppo.PPOAlgoConfig:
    return ppo.PPOAlgoConfig(rollout_batch_size=rollout, num_minibatches=minibatches, micro_batch_size=micro)


def every_rank(split: online.MinibatchSplit, rows: torch.Tensor) -> list[list[torch.Tensor]]:
    return [split.chunks(rows, r) for r in range(split.world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rollout,minibatches", [(8, 1), (8, 2), (24, 2), (48, 3), (64, 2), (60, 5)])
@pytest.mark.parametrize("micro", [1, 2, 3, 4, 5, 8, 32])
def test_every_rank_gets_an_equal_share_in_the_same_number_of_calls(world, rollout, minibatches, micro):
    a = algo(rollout, minibatches, micro)
    if rollout % (world * minibatches):
        with pytest.raises(ConfigError):
            online.minibatch_split(a, world)
        return
    s = online.minibatch_split(a, world)
    share = rollout // minibatches // world
    assert (s.minibatch, s.per_rank, s.accum_steps) == (rollout // minibatches, share, -(-share // micro))
    rows = torch.randperm(s.minibatch)
    per_rank = every_rank(s, rows)
    for chunks in per_rank:
        assert len(chunks) == s.accum_steps                     # the same number of forward/backward calls
        assert sum(len(c) for c in chunks) == share             # the same number of rows
        assert all(1 <= len(c) <= min(micro, s.chunk) for c in chunks)  # never empty, never above micro
    # accumulation step k has the same size on every rank (same shapes in lockstep)
    assert len({tuple(len(c) for c in chunks) for chunks in per_rank}) == 1
    # together: the minibatch, each row once
    assert sorted(torch.cat([c for chunks in per_rank for c in chunks]).tolist()) == sorted(rows.tolist())


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("rollout,minibatches,micro", [(64, 2, 32), (64, 2, 4), (16, 2, 4), (8, 2, 8), (48, 2, 5),
                                                       (96, 2, 5), (20, 2, 4)])
def test_world_size_invariant_chunks(world, rollout, minibatches, micro):
    """``world`` processes cut the minibatch exactly as one process does with micro_batch_size =
    split.chunk when the chunks are equal (so, in particular, with the same micro_batch_size when it
    divides the per-rank share): the 2-process tests compare against that 1-process run. Also the
    unequal 10 rows x 2 ranks, micro 4 -> chunks 3, 3, 2, 2 (the 2-process test's uneven case)."""
    if rollout % (world * minibatches):
        pytest.skip("refused")
    s = online.minibatch_split(algo(rollout, minibatches, micro), world)
    one = online.minibatch_split(algo(rollout, minibatches, s.chunk), 1)
    if s.per_rank % s.accum_steps and (rollout, world) != (20, 2):
        return  # unequal chunks: no 1-process micro_batch_size need cut alike
    rows = torch.randperm(s.minibatch)
    got = sorted(tuple(c.tolist()) for chunks in every_rank(s, rows) for c in chunks)
    assert got == sorted(tuple(c.tolist()) for c in one.chunks(rows, 0))
    if s.per_rank % micro == 0:
        assert s.chunk == micro


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_default_configs_split_on_1_2_4_8_processes(world):
    """configs/ppo.yaml and the quickstart's PPO (rollout 64, 2 minibatches, micro 32): on 2+
    processes each rank's share is below micro_batch_size (the hang of issue 17), now one chunk each."""
    from pathlib import Path

    import yaml
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml").read_text())["ppo"]
    for rollout, minibatches, micro in ((raw["rollout_batch_size"], raw["num_minibatches"], raw["micro_batch_size"]),
                                        (64, 2, 32)):
        s = online.minibatch_split(algo(rollout, minibatches, micro), world)
        assert s.per_rank == rollout // minibatches // world and s.accum_steps == 1
        assert all(len(chunks) == 1 for chunks in every_rank(s, torch.arange(s.minibatch)))


def test_grad_accum_follows_the_split(monkeypatch):
    cfg = ppo.PPOConfig(ppo=algo(64, 2, 12))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cfg.train.grad_accum == 3   # 32 rows in 3 chunks (11, 11, 10)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cfg.train.grad_accum == 2   # 16 rows each in 2 chunks of 8
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert cfg.train.grad_accum == 1   # 4 rows each, one chunk (was: ranks 4-7 idle)


@pytest.mark.parametrize("rollout,minibatches,world,expect", [
    (64, 2, 3, r"ppo.rollout_batch_size=64 .* 3 process\(es\) x ppo.num_minibatches=2 .*multiple of 6 "
               r"\(e.g. 60 or 66\).*a number of processes in \[1, 2, 4, 8, 16, 32\]"),
    (64, 3, 2, r"multiple of 6 \(e.g. 60 or 66\).*ppo.num_minibatches one of \[1, 2, 4, 8, 16, 32\]"),
    (4, 1, 8, r"multiple of 8 \(e.g. 8\), or a number of processes in \[1, 2, 4\]$"),
])
def test_an_uneven_split_is_refused_with_the_values_that_work(rollout, minibatches, world, expect):
    with pytest.raises(ConfigError, match=expect):
        online.minibatch_split(algo(rollout, minibatches, 8), world)


@pytest.mark.parametrize("key", ["rollout_batch_size", "num_minibatches", "micro_batch_size"])
def test_non_positive_sizes_are_refused(key):
    a = algo(8, 2, 4)
    setattr(a, key, 0)
    with pytest.raises(ConfigError, match=f"ppo.{key}=0"):
        online.minibatch_split(a, 1)


def test_an_uneven_split_fails_before_the_run_dir_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "backbone.json").write_text(json.dumps({"path": str(tmp_path / "no-backbone")}))
    cfg = load_config(ppo.PPOConfig, None, [f"output_dir={tmp_path / 'ppo'}", f"sft_run={sft}",
                                            "reward_fn=tests.ppo_helpers:count_target", "value.init=fresh",
                                            "ppo.rollout_batch_size=10", "ppo.num_minibatches=3",
                                            "tracking.wandb=false"])
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size=10 .*multiple of 3 \(e.g. 9 or 12\)"):
        ppo.run(cfg)
    assert not (tmp_path / "ppo").exists()
