"""Exact resume, shared by the supervised trainer and PPO: wrap the model for accelerate /
DeepSpeed, then restore trainable tensors, optimizer, scheduler, any other stateful object (PPO's
KL controller) and, last, every RNG from the run's latest checkpoint (docs/invariants.md #7)."""
from __future__ import annotations

from pathlib import Path

from align.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align.guard import check_tensors


def prepare_resumable(rt, model, optimizer, scheduler, run_dir: Path, resume: bool, micro_batch_size: int,
                      stage: str, stateful: dict | None = None, **prepare_kwargs):
    """``rt.prepare`` the model and optimizer, restoring the latest checkpoint when ``resume``.
    Returns (engine, optimizer, the step to start from, the checkpoint's state dict or {})."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    loaded = None
    if ckpt is not None:
        # trainable tensors before wrapping; the optimizer after (prepare re-creates it)
        loaded = load_checkpoint(ckpt, rank=rt.rank, world_size=rt.world_size)
        rt.load_trainable(model, loaded["trainable"])
    engine, optimizer = rt.prepare(model, optimizer, micro_batch_size, **prepare_kwargs)
    if loaded is None:
        return engine, optimizer, 0, {}
    state = loaded["state"]
    if loaded["optimizer"] is not None:
        rt.load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for key, obj in (stateful or {}).items():
        obj.load_state_dict(state[key])
    load_checkpoint(ckpt, rank=rt.rank, world_size=rt.world_size)  # RNG last, after anything that consumed it
    rt.print(f"[{stage}] resumed from {ckpt} at step {state['step']}")
    return engine, optimizer, state["step"], state


def save_resumable(rt, run_dir: Path, step: int, model, optimizer, scheduler, keep: int,
                   stateful: dict | None = None, extra: dict | None = None) -> None:
    """A checkpoint ``prepare_resumable`` restores exactly (written atomically by every rank)."""
    trainable = rt.trainable_state(model)
    check_tensors(trainable, step)   # a NaN never reaches a checkpoint, so rotation never drops the last good one
    state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": rt.world_size,
             **{k: obj.state_dict() for k, obj in (stateful or {}).items()}, **(extra or {})}
    save_checkpoint(run_dir, step, trainable, rt.optimizer_state(optimizer), state, rank=rt.rank,
                    is_main=rt.is_main, keep=keep, barrier=rt.barrier)
