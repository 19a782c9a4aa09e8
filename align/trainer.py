"""The supervised training loop shared by the SFT and reward stages.

One optimizer step consumes a *global batch* of ``batch_size * world_size * grad_accum``
examples, drawn from a per-epoch permutation that depends only on the seed, so the data order is
the same whatever the world size; the global batch is cut into micro-batches, micro-batch ``m``
going to rank ``m % world`` as accumulation step ``m // world``. The position in the data is
just the step number, so a resumed run sees exactly the batches an uninterrupted one would.
accelerate handles devices, DDP, DeepSpeed and gradient accumulation.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from align.config import TrainConfig
from align.distributed import Runtime
from align.guard import check_loss, mark_started
from align.resume import prepare_resumable, save_resumable
from align.tracking import Tracker


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        if kind == "constant":
            return 1.0
        raise ValueError(f"train.scheduler={kind!r}: choose cosine, linear or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                             betas=tuple(cfg.adam_betas))


@dataclass
class Trainer:
    stage: str
    run_dir: Path
    cfg: TrainConfig
    rt: Runtime
    model: Any                                # AlignModel (unwrapped)
    train_set: list
    collate: Callable[[list], dict]
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]]
    tracker: Tracker
    eval_fn: Callable[[int], dict] | None = None
    log_extra: Callable[[int], None] | None = None
    extra_state: dict = field(default_factory=dict)
    dtype: str = "float32"                    # model.dtype: DeepSpeed's bf16/fp16 flags follow it
    # how many units a training example adds to its loss's denominator (preference stages: 1 for a
    # ranked group, 0 for one with no ordered pair). When given, every micro-batch gets ``loss_norm``
    # = the count over the step's global batch / (grad_accum * world): the loss divides its
    # (weighted) sum by it, so after accelerate's division by grad_accum and the average over
    # processes the gradient is sum(w * grad L) / N over the global batch, however it is split.
    loss_units: Callable[[Any], float] | None = None

    def __post_init__(self):
        c, world = self.cfg, self.rt.world_size
        self.per_step = c.batch_size * world * c.grad_accum
        self.steps_per_epoch = len(self.train_set) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.stage}: {len(self.train_set)} training examples cannot fill one global batch of "
                f"{self.per_step} (train.batch_size x processes x train.grad_accum)")
        self.total_steps = c.max_steps or math.ceil(c.epochs * self.steps_per_epoch)

    # ---------------------------------------------------------------- data order
    def global_batch(self, step: int) -> list[int]:
        epoch, idx = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g)
        return perm[idx * self.per_step:(idx + 1) * self.per_step].tolist()

    def loss_norm(self, step: int) -> float | None:
        """The global batch's ``loss_units`` divided by its number of micro-batches."""
        if self.loss_units is None:
            return None
        total = sum(float(self.loss_units(self.train_set[i])) for i in self.global_batch(step))
        return total / (self.cfg.grad_accum * self.rt.world_size)

    def my_micro_batches(self, step: int) -> list[list[int]]:
        ids, b, world = self.global_batch(step), self.cfg.batch_size, self.rt.world_size
        micros = [ids[i:i + b] for i in range(0, len(ids), b)]
        return [m for k, m in enumerate(micros) if k % world == self.rt.rank]

    # ---------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> dict:
        rt, c = self.rt, self.cfg
        params = self.model.trainable_parameters()
        optimizer = make_optimizer(params, c)
        scheduler = make_scheduler(optimizer, c.scheduler, c.warmup_steps, self.total_steps)
        engine, optimizer, start, state = prepare_resumable(
            rt, self.model, optimizer, scheduler, self.run_dir, resume, c.batch_size, self.stage,
            max_grad_norm=c.max_grad_norm, dtype=self.dtype)
        params = self.model.trainable_parameters()  # FSDP2 replaced them by their shards
        self.extra_state.update(state.get("extra", {}))
        bar = tqdm(total=self.total_steps, initial=start, desc=self.stage, disable=not rt.is_main,
                   dynamic_ncols=True)
        last_eval: dict = {}
        step = start
        if self.eval_fn and c.eval_every and start == 0:  # the baseline every curve starts from
            engine.eval()
            self.tracker.log(self.eval_fn(0), 0)
        t0 = time.time()
        mark_started(self.run_dir)
        while step < self.total_steps:
            engine.train()
            sums: dict[str, float] = {}
            norm = self.loss_norm(step)
            for micro in self.my_micro_batches(step):
                batch = self.collate([self.train_set[i] for i in micro])
                batch = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if norm is not None:
                    batch["loss_norm"] = norm
                with rt.accelerator.accumulate(engine):
                    loss, metrics = self.loss_fn(engine, batch)
                    check_loss(loss, step + 1, self.stage, rt, f" (micro-batch of train examples {micro[:8]})")
                    rt.accelerator.backward(loss)
                    if rt.accelerator.sync_gradients and c.max_grad_norm > 0:
                        gn = rt.accelerator.clip_grad_norm_(params, c.max_grad_norm)
                        if gn is not None:
                            sums["grad_norm"] = float(gn)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / c.grad_accum
            scheduler.step()
            step += 1
            bar.update(1)
            logs = rt.mean_across({k: v for k, v in sums.items() if k != "grad_norm"})
            if "grad_norm" in sums:
                logs["grad_norm"] = sums["grad_norm"]
            if step % max(1, c.log_every) == 0 or step == self.total_steps:
                logs.update(lr=scheduler.get_last_lr()[0], epoch=step / self.steps_per_epoch,
                            seconds=time.time() - t0)
                self.tracker.log(logs, step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if self.eval_fn and ((c.eval_every and step % c.eval_every == 0) or step == self.total_steps):
                engine.eval()
                last_eval = self.eval_fn(step)
                self.tracker.log(last_eval, step)
            if (c.save_every and step % c.save_every == 0) or step == self.total_steps:
                self.save(step, optimizer, scheduler)
            if c.stop_after_steps and step >= c.stop_after_steps and step < self.total_steps:
                rt.print(f"[{self.stage}] stopping after {step} steps (train.stop_after_steps)")
                bar.close()
                return {"stopped_at": step}
        bar.close()
        engine.eval()
        return {"steps": step, **last_eval}

    def save(self, step: int, optimizer, scheduler) -> None:
        save_resumable(self.rt, self.run_dir, step, self.model, optimizer, scheduler, self.cfg.keep_checkpoints,
                       extra={"extra": self.extra_state})


@contextlib.contextmanager
def eval_mode(module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
