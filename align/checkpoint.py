"""Atomic checkpoints for exact resume.

A checkpoint is a directory ``checkpoints/step_<N>/`` with:

* ``trainable.safetensors``: every trainable tensor (adapters, heads) by name;
* ``optimizer.pt``: the optimizer's state_dict (tensors and numbers only, so it loads with
  ``torch.load(weights_only=True)``);
* ``rng.pt``: torch (CPU and CUDA) RNG states as tensors; ``rng.json``: Python's ``random`` state;
* ``state.json``: the trainer's position (step, epoch, batch index), scheduler state, KL controller
  and anything else the stage needs.

It is written to a temporary directory and renamed into place, then ``checkpoints/latest`` is
replaced atomically, so a kill at any moment leaves the previous checkpoint usable. ``manifest.json``
records every file's size and SHA-256, so a truncated or altered file is found before a resume
uses it (``verify_checkpoint``); ``find_checkpoint`` falls back past such a checkpoint to the newest
one that verifies, naming what it skipped.
Under DeepSpeed the optimizer state is partitioned across ranks, so each rank saves its own
``optimizer_rank<r>.pt`` (same format) and ``rng_rank<r>.pt`` into the same directory: the directory
must be on a filesystem every process sees (shared by all nodes), and a checkpoint resumes only
with the number of processes that wrote it (``check_resumable``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from align.rundir import RunDir


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` whose bytes depend only on the content: tensors go in by
    sorted name and the header is rewritten with sorted keys (safetensors keeps ``__metadata__``
    in a Rust HashMap, so its order changes from run to run and even from call to call)."""
    path = Path(path)
    try:
        save_file({k: tensors[k] for k in sorted(tensors)}, path,
                  metadata=None if metadata is None else {k: metadata[k] for k in sorted(metadata)})
    except Exception as e:  # noqa: BLE001 - safetensors' Rust errors (a full disk among them) are no OSError
        if type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"cannot write {path}: {e}") from None
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)             # the format pads the header to 8 bytes
        if len(text) == n:                          # the usual case: same bytes, other order
            f.seek(8)
            f.write(text)
            return
    tmp = path.with_name(path.name + ".tmp")         # a header of another length: copy the data
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + n)
        dst.write(len(text).to_bytes(8, "little"))
        dst.write(text)
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)
    v, st, g = plain["python"]
    random.setstate((v, tuple(st), g))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer,
                    state: dict, *, rank: int = 0, is_main: bool = True, keep: int = 2,
                    barrier=None) -> Path:
    ckpt_root = RunDir(run_dir).checkpoints
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    if not tmp.is_dir():  # rank 0 made it: another node without a shared filesystem
        raise RuntimeError(f"rank {rank} cannot see {tmp}, made by rank 0: every process writes its "
                           f"optimizer shard and RNG state into the checkpoint directory, so on several "
                           f"nodes output_dir must be on a filesystem shared by all nodes")
    try:
        _write_checkpoint_files(tmp, trainable, optimizer, state, rank, is_main)
        if barrier:
            barrier()
        if is_main:
            (tmp / MANIFEST).write_text(json.dumps({f.name: _digest(f) for f in sorted(tmp.iterdir())}, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except OSError:   # e.g. a full disk: the half-written directory goes, the previous checkpoints stay
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, ckpt_root / "latest")
        done = _steps(ckpt_root)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def _write_checkpoint_files(tmp: Path, trainable: dict, optimizer, state: dict, rank: int, is_main: bool) -> None:
    opt_name = "optimizer.pt" if rank == 0 else f"optimizer_rank{rank}.pt"
    if optimizer is not None:  # an optimizer, or its state as Runtime.optimizer_state gives it
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / opt_name)
    rng_t, rng_p = _rng_state()
    torch.save(rng_t, tmp / f"rng_rank{rank}.pt")
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_p))
    if is_main:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                         tmp / "trainable.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


MANIFEST = "manifest.json"


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def verify_checkpoint(path: Path) -> str | None:
    """None when checkpoint ``path`` is complete and unaltered, else what is wrong with it (a
    missing, truncated or changed file, named). Checkpoints written before manifests existed are
    checked for their files and a readable ``state.json``."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())
        except ValueError:
            return f"{MANIFEST} is unreadable"
        for name, rec in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != rec["bytes"]:
                return f"{name} is truncated or changed ({f.stat().st_size} bytes, {rec['bytes']} written)"
            if _digest(f)["sha256"] != rec["sha256"]:
                return f"{name} does not match its checksum"
        return None
    for name in ("state.json", "trainable.safetensors", "rng_rank0.pt", "rng_rank0.json"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / "state.json").read_text())
    except ValueError:
        return "state.json is unreadable"
    return None


def _steps(ckpt_root: Path) -> list[Path]:
    return sorted((p for p in ckpt_root.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest checkpoint of ``run_dir`` that verifies (the one ``checkpoints/latest`` names
    first), and the newer ones skipped on the way, each with its reason."""
    root = RunDir(run_dir).checkpoints
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    candidates = ([named] if named is not None else []) + [p for p in reversed(_steps(root)) if p != named]
    skipped: list[tuple[str, str]] = []
    if named is not None and not named.is_dir():
        skipped.append((named.name, "named by checkpoints/latest but missing"))
        candidates = candidates[1:]
    for c in candidates:
        problem = verify_checkpoint(c)
        if problem is None:
            return c, skipped
        skipped.append((c.name, problem))
    return None, skipped


def set_aside(run_dir: Path, bad: list[str], good: Path) -> None:
    """Move checkpoints that failed verification to ``checkpoints/bad_<name>`` (kept for a look,
    out of rotation) and point ``latest`` at ``good``, the one that verified."""
    root = RunDir(run_dir).checkpoints
    for name in bad:
        if (root / name).is_dir():
            os.replace(root / name, root / f"bad_{name}")
    pointer = root / ".latest.tmp"
    pointer.write_text(good.name)
    os.replace(pointer, root / "latest")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None. A resumed stage has verified it and
    pointed ``latest`` at it first (``find_checkpoint``, ``set_aside``), so it is not hashed again."""
    pointer = RunDir(run_dir).checkpoints / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


class ResumeError(ValueError):
    pass


def recorded_world_size(path: Path) -> int:
    """The number of processes that wrote checkpoint ``path``: ``state.json``'s ``world_size``, or
    for checkpoints without it, the number of per-rank RNG files."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if "world_size" in state:
        return int(state["world_size"])
    return max(1, len(list(path.glob("rng_rank*.pt"))))


def check_resumable(path: Path, world_size: int) -> None:
    """Refuse to resume checkpoint ``path`` with another number of processes: each rank restores
    its own optimizer shard (``optimizer_rank<r>.pt``) and RNG state (``rng_rank<r>.pt``), so extra
    ranks would find none and missing ones would leave shards unread."""
    recorded = recorded_world_size(path)
    if recorded != world_size:
        raise ResumeError(
            f"cannot resume from {path}: it was written by {recorded} process{'es' * (recorded != 1)} "
            f"and this run has {world_size}. Each process restores its own optimizer shard and RNG "
            f"state, so resume with {recorded} process{'es' * (recorded != 1)} (e.g. --nproc {recorded}), "
            f"or start a new run in another output_dir")


def load_checkpoint(path: Path, *, rank: int = 0, world_size: int | None = None) -> dict:
    """Returns {"trainable", "optimizer", "state"} and restores this rank's RNG states. With
    ``world_size`` (the current number of processes), a checkpoint written by another number is
    refused first (``check_resumable``)."""
    path = Path(path)
    if world_size is not None:
        check_resumable(path, world_size)
    opt_name = "optimizer.pt" if rank == 0 else f"optimizer_rank{rank}.pt"
    missing = [f for f in (f"rng_rank{rank}.pt", f"rng_rank{rank}.json", "state.json")
               if not (path / f).exists()]
    if missing:
        raise ResumeError(
            f"rank {rank} cannot find {missing} in {path}: a checkpoint must be visible to every "
            f"process (on several nodes, output_dir must be on a filesystem shared by all nodes), "
            f"and resumed with the number of processes that wrote it")
    opt = None
    if (path / opt_name).exists():
        with torch.serialization.safe_globals(_optimizer_state_globals()):
            opt = torch.load(path / opt_name, weights_only=True)
    rng_t = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
    _set_rng_state(rng_t, json.loads((path / f"rng_rank{rank}.json").read_text()))
    return {"trainable": load_file(path / "trainable.safetensors"), "optimizer": opt,
            "state": json.loads((path / "state.json").read_text())}


def _optimizer_state_globals() -> list:
    """The non-tensor types a DeepSpeed ZeRO optimizer puts in its state dict (the stage enum, the
    plain-attribute loss scaler, ZeRO-2's (numel, start) slice records), allow-listed by name so loading stays ``weights_only=True``
    (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, fragment_address]
