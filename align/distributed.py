"""Processes, devices and DeepSpeed, through accelerate.

``Runtime`` is the one place that knows whether we run in one process, under DDP or under
DeepSpeed ZeRO-2/3: it builds the ``Accelerator`` (gloo on machines without a GPU, which
accelerate would otherwise silently run as rank 0 of 1), wraps the model and optimizer, and
gathers/scatters the trainable tensors for checkpoints (under ZeRO-3 they are partitioned).
Only trainable adapter/head tensors ever reach the optimizer.
"""
from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


class Runtime:
    def __init__(self, grad_accum: int = 1, seed: int = 0, device: str | None = None):
        kwargs, cpu = [], device == "cpu"
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs.append(InitProcessGroupKwargs(backend="gloo"))
            # DDP (the ddp preset, distributed_type MULTI_GPU) without a GPU: accelerate would set up
            # the process group but run as DistributedType.NO (no DDP wrapper, gather/reduce no-ops:
            # unsynchronised replicas); cpu=True makes it MULTI_CPU over gloo. Not under DeepSpeed,
            # which cpu=True would switch off.
            cpu = cpu or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        self.accelerator = Accelerator(gradient_accumulation_steps=grad_accum,
                                       step_scheduler_with_optimizer=False, kwargs_handlers=kwargs,
                                       cpu=cpu)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = torch.device(device) if device else self.accelerator.device
        self.ds = self.accelerator.state.deepspeed_plugin
        self.zero_stage = self.ds.zero_stage if self.ds is not None else 0
        # per-rank seed for sampling (docs/ppo-notes.md §F7: seed + rank * 100003); data order uses the seed alone
        self.local_seed = seed + self.rank * 100_003

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def prepare(self, model, optimizer, micro_batch_size: int | None = None, max_grad_norm: float = 1.0):
        if self.ds is not None:
            cfg = self.ds.deepspeed_config
            if cfg.get("gradient_clipping", "auto") == "auto":
                cfg["gradient_clipping"] = max_grad_norm
            if isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") == "auto":
                cfg["bf16"]["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                cfg["train_micro_batch_size_per_gpu"] = micro_batch_size or 1
            cfg["gradient_accumulation_steps"] = self.accelerator.gradient_accumulation_steps
            if cfg.get("train_batch_size") == "auto":
                cfg.pop("train_batch_size")
        engine, optimizer = self.accelerator.prepare(model, optimizer)
        return engine, optimizer

    def mean_across(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def gather_objects(self, items: list) -> list:
        if self.world_size == 1:
            return items
        from accelerate.utils import gather_object
        return gather_object(items)

    @contextlib.contextmanager
    def gathered(self, params, modifier_rank=None):
        """Full tensors of (ZeRO-3 partitioned) ``params`` inside the context."""
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
                yield
        else:
            yield

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Restore this rank's optimizer state (as written by ``optimizer.state_dict()``). A ZeRO
        optimizer takes the list of every rank's partition and picks its own by rank."""
        if self.ds is not None:
            states = [None] * self.world_size
            states[self.rank] = state
            optimizer.load_state_dict(states)
        else:
            optimizer.load_state_dict(state)

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with self.gathered([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}

    def load_trainable(self, model, state: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in named]
        if missing or unknown:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
        with self.gathered([named[n] for n in state], modifier_rank=0), torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t.to(named[n].dtype))
