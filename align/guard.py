"""What a run promises about its run directory and its numbers (docs/guarantees.md).

* **One run per directory.** The main process holds an exclusive ``flock`` on
  ``OUTPUT_DIR/.lock`` for the life of the run; a second run on it is refused at once, naming the
  holder's pid and host. The kernel drops the lock when its process dies, so a killed run leaves no
  stale lock.
* **Nothing left behind by a refused run.** A run directory this run created (or found empty) is
  removed again when the run fails before its training loop starts (a bad record, an unloadable
  backbone, a bad prompt file): the corrected rerun is not refused as "already holds a run".
* **A finished run stays finished.** ``resume=true`` on a run whose ``summary.json`` says it
  finished changes nothing and returns that summary.
* **No non-finite number is trained on or saved.** Rewards from every source, every loss before
  its backward, and every trainable tensor before a checkpoint are checked; a non-finite one stops
  the run with a one-line error naming the step, before anything is written.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from align.rundir import RunDir

_LOCKS: dict[Path, int] = {}     # run dir -> the open lock file of this process
_OWNED: set[Path] = set()        # run dirs this process created (or found empty) and locked
_STARTED: set[Path] = set()      # run dirs whose training loop has started


class NonFiniteError(ValueError):
    """A loss, reward or tensor that is NaN or infinite."""


class FinishedRun(Exception):
    """``resume=true`` on a finished run: nothing to do."""

    def __init__(self, summary: dict):
        super().__init__("finished")
        self.summary = summary


def _key(run_dir) -> Path:
    return Path(run_dir).resolve()


def acquire(run_dir: Path, fresh: bool) -> None:
    """Take the run directory's lock (main process) or refuse with who holds it. ``fresh``: the
    directory was made (or found empty) by this run, so a failure before training removes it."""
    key = _key(run_dir)
    fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        from align.config import ConfigError
        pid, _, host = holder.partition(" ")
        raise ConfigError(f"output_dir {run_dir} is in use by another align run (pid {pid} on {host or '?'}); "
                          f"wait for it to finish or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _LOCKS[key] = fd
    if fresh:
        _OWNED.add(key)


def release(run_dir) -> None:
    key = _key(run_dir)
    fd = _LOCKS.pop(key, None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _OWNED.discard(key)
    _STARTED.discard(key)


def mark_started(run_dir) -> None:
    """The training loop has begun: from here a failure keeps the run directory (its checkpoints and
    metrics are the user's)."""
    _STARTED.add(_key(run_dir))


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a finished run in ``run_dir`` (None when it has none, or stopped early)."""
    path = RunDir(run_dir).summary_file
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    return None if "stopped_at" in summary else summary


def stage_entry(run):
    """Wraps a stage's ``run(cfg)``: a finished run resumed is a no-op; a failure before the
    training loop removes the run directory this run created; the lock is released at the end."""
    @functools.wraps(run)
    def wrapper(cfg, *args, **kwargs):
        run_dir = Path(cfg.output_dir) if getattr(cfg, "output_dir", "") else None
        try:
            return run(cfg, *args, **kwargs)
        except FinishedRun as done:
            return done.summary
        except BaseException:
            _close_progress_bars()   # so the error starts on its own line
            if run_dir is not None:
                key = _key(run_dir)
                if key in _OWNED and key not in _STARTED:
                    release(run_dir)
                    shutil.rmtree(key, ignore_errors=True)
            raise
        finally:
            if run_dir is not None:
                release(run_dir)
    return wrapper


def _close_progress_bars() -> None:
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ------------------------------------------------------------------------------ finite numbers
def all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def check_loss(loss: torch.Tensor, step: int, stage: str, rt=None, what: str = "") -> None:
    """Stop before a non-finite loss reaches backward and the optimizer. Every process agrees (one
    small collective when there are several), so no rank is left waiting at the next one."""
    error = None if all_finite(loss) else NonFiniteError(
        f"[{stage}] step {step}: the loss is {float(loss.detach()):g}{what}; stopped before the optimizer step, no "
        f"checkpoint written (the last one is intact): lower the learning rate or check the data")
    agree(rt, error, step)


def check_rewards(rewards, n: int, source: str, step: int) -> torch.Tensor:
    """Rewards of ``n`` responses as a float tensor (a tensor stays on its device), or a one-line
    error naming their source when there are not ``n`` of them or one is not a finite number."""
    if not torch.is_tensor(rewards):
        try:
            rewards = torch.tensor([float(r) for r in rewards])
        except (TypeError, ValueError):
            raise NonFiniteError(f"step {step}: {source} returned {list(rewards)!r:.200}; it must return one number "
                                 f"per response") from None
    rewards = rewards.float().reshape(-1)
    if len(rewards) != n:
        raise NonFiniteError(f"step {step}: {source} returned {len(rewards)} rewards for {n} responses")
    bad = (~torch.isfinite(rewards)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise NonFiniteError(f"step {step}: {source} gave a non-finite reward ({float(rewards[i])}) for response "
                             f"{i} of {n}; nothing was trained on it")
    return rewards


def agree(rt, error: Exception | None, step: int) -> None:
    """Raise ``error`` on this process, and a matching one on every other, when any process has one
    (one small collective when there are several), so no rank is left waiting at a collective."""
    if rt is not None and rt.world_size > 1:
        if rt.mean_across({"ok": float(error is None)})["ok"] < 1.0:
            raise error or NonFiniteError(f"step {step}: another process stopped on a non-finite value")
    elif error is not None:
        raise error


def check_tensors(tensors: dict, step: int) -> None:
    """Refuse to checkpoint a non-finite trainable tensor."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not all_finite(t):
            raise NonFiniteError(f"step {step}: trainable tensor {name} holds NaN or inf; no checkpoint written "
                                 f"(the last one is intact)")
