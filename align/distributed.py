"""Processes, devices and DeepSpeed, through accelerate.

``Runtime`` is the one place that knows whether we run in one process, under DDP or under
DeepSpeed ZeRO-2/3: it builds the ``Accelerator`` (gloo on machines without a GPU, which
accelerate would otherwise silently run as rank 0 of 1), wraps the model and optimizer, and
gathers/scatters the trainable tensors for checkpoints (under ZeRO-3 they are partitioned).
Only trainable adapter/head tensors ever reach the optimizer.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from align import fsdp
from align.fsdp import settings_from_env as fsdp_settings_from_env


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
        declared = declared_deepspeed_config()
        # FSDP2: align shards the model itself (align/fsdp.py); accelerate must not also see FSDP
        # (it would wrap nothing on CPU and refuse an optimizer prepared without its model on GPU)
        self.fsdp = fsdp_settings_from_env()
        if self.fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = "false"
        self.accelerator = Accelerator(gradient_accumulation_steps=grad_accum,
                                       step_scheduler_with_optimizer=False, kwargs_handlers=kwargs,
                                       cpu=cpu)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = torch.device(device) if device else self.accelerator.device
        self.ds = self.accelerator.state.deepspeed_plugin
        # the DeepSpeed config as written and accelerate's --mixed_precision, read before accelerate
        # filled the config's "auto" values (a later Runtime in the same process sees them filled)
        self._ds_declared, self._ds_source = declared if self.ds is not None else ({}, "")
        self._launch_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        self.zero_stage = self.ds.zero_stage if self.ds is not None else 0
        # under ZeRO-3: gather the whole model for sampling (True) or let DeepSpeed fetch it module
        # by module (False); set from model.zero3_gather_for_generation by the stage (generation())
        self.gather_for_generation = True
        self.engine = None  # the DeepSpeed engine, once prepare() built it
        self.shard_owner: dict[int, torch.nn.Module] = {}  # FSDP2: parameter id -> module of its group
        # per-rank seed for sampling (docs/ppo-notes.md §F7: seed + rank * 100003); data order uses the seed alone
        self.local_seed = seed + self.rank * 100_003

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def prepare(self, model, optimizer, micro_batch_size: int | None = None, max_grad_norm: float = 1.0,
                dtype: str = "float32"):
        """Wrap ``model`` and ``optimizer`` (DDP or a DeepSpeed engine). Under DeepSpeed the stage's
        ``max_grad_norm`` (0: off) becomes the engine's ``gradient_clipping`` and ``model.dtype``
        decides its bf16/fp16 flags (see ``deepspeed_settings``)."""
        if self.fsdp is not None:
            return self._prepare_fsdp(model, optimizer, dtype)
        if self.ds is not None:
            cfg = self.ds.deepspeed_config
            deepspeed_settings(cfg, dtype=dtype, max_grad_norm=max_grad_norm, declared=self._ds_declared,
                               mixed_precision=self._launch_precision, source=self._ds_source)
            if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                cfg["train_micro_batch_size_per_gpu"] = micro_batch_size or 1
            cfg["gradient_accumulation_steps"] = self.accelerator.gradient_accumulation_steps
            if cfg.get("train_batch_size") == "auto":
                cfg.pop("train_batch_size")
            if self.zero_stage == 3:
                register_role_tensors(model)
        engine, optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = engine if self.ds is not None else None
        return engine, optimizer

    def _prepare_fsdp(self, model, optimizer, dtype: str):
        """Shard ``model`` with FSDP2 (align/fsdp.py) and point ``optimizer`` at the sharded
        parameters; gradient clipping stays with the stage (``accelerator.clip_grad_norm_`` is
        DTensor-aware). Returns the same (sharded) model: call it as before."""
        fsdp.check_precision(self._launch_precision, dtype)
        if not torch.distributed.is_initialized():  # one process: nothing to shard across
            return model, self.accelerator.prepare(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.shard_owner = fsdp.shard(model, self.fsdp, self.device)
        new = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [new[names[id(p)]] for p in group["params"]]
        return model, self.accelerator.prepare(optimizer)

    def check_shared_dir(self, path: str | os.PathLike) -> None:
        """Every process must see the directory that rank 0 created: all ranks write their optimizer
        shard and RNG state into the same checkpoint directory, and resume reads them back. Rank 0
        writes a one-off token there and every rank reads it back; a rank on another node without a
        shared filesystem (or with its own, stale copy of the directory) stops every rank here with
        a clear message, instead of failing at the first checkpoint or resuming differently."""
        if self.world_size == 1:
            return
        path = Path(path)
        probe = path / f".align_shared_check_{os.environ.get('MASTER_PORT', '0')}"
        token = f"{os.getpid()}-{time.time_ns()}" if self.is_main else None
        if self.is_main:
            probe.write_text(token)
        self.barrier()
        token = self._broadcast_object(token)
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        missing = [r for r, ok in enumerate(self.gather_objects([seen])) if not ok]
        self.barrier()
        if self.is_main:
            probe.unlink(missing_ok=True)
        if missing:
            raise RuntimeError(shared_fs_message(path, missing, self.world_size))

    def _broadcast_object(self, obj):
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([obj], from_process=0)[0]

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
            from align.backbone import gathered_whole
            with gathered_whole(params, modifier_rank=modifier_rank):
                yield
        elif self.shard_owner:  # FSDP2: read the tensors from their modules inside the context
            owners = [self.shard_owner[id(p)] for p in params if id(p) in self.shard_owner]
            if owners and modifier_rank is not None:
                raise NotImplementedError("FSDP2 does not write an unsharded parameter back to its shards")
            with fsdp.unsharded(owners):
                yield
        else:
            yield

    @contextlib.contextmanager
    def generation(self, model):
        """The context every rank enters around sampling from ``model``; yields the ``all_done``
        callable ``align.generation.sample`` takes (None when ranks need not agree on stopping).

        * Not ZeRO-3: nothing to do.
        * ZeRO-3 with ``gather_for_generation`` (``model.zero3_gather_for_generation``, the
          default): every parameter is gathered whole for the whole sampling loop. Fast (no
          communication per token), but each process holds the whole backbone while it samples.
        * ZeRO-3 without: nothing is gathered up front; DeepSpeed's module hooks fetch each
          module's parameters when it runs and release them after it, layer by layer, at every
          decoding step, so a process never holds more than its partition plus the modules in
          flight. Every fetch is a collective, so all ranks must make the same forward calls:
          sampling stops only when every rank's rows have stopped (``all_done``), and every rank
          samples the same number of batches (PPO's per-rank rollout shares are equal).
        """
        if self.shard_owner:  # FSDP2: as ZeRO-3, whole for the loop or fetched group by group
            if self.gather_for_generation:
                with fsdp.unsharded(self.shard_owner.values(), keep_across_forwards=True):  # same order on every rank
                    yield None
            else:
                yield self.all_true
        elif self.zero_stage != 3:
            yield None
        elif self.gather_for_generation and self.engine is not None:
            # DeepSpeed's own context: everything gathered and the engine's module hooks taken off
            # for the loop (with the hooks on, their prefetches put parameters in flight that the
            # gather's exit then cannot partition), put back after it
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
            with unwrap_model_for_generation(self.engine):
                yield None
        elif self.gather_for_generation:  # no engine yet: no hooks either
            with self.gathered(model.parameters()):
                yield None
        else:
            yield self.all_true

    def all_true(self, flag: bool) -> bool:
        """``flag`` and'ed over every process (one small all-reduce)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum")) == 0.0

    def memory_report(self, model) -> list[dict]:
        """For every process (all must call): its peak resident memory so far (``ru_maxrss``), peak
        GPU memory when on CUDA, and the bytes of backbone parameters it holds: its ZeRO-3
        partition, or the whole backbone otherwise (tied weights counted once)."""
        import resource

        for owner in dict.fromkeys(self.shard_owner.values()):  # FSDP2: the root stays gathered after
            owner.reshard()  # a forward (torch's auto policy); count the share it keeps between steps
        def held(p):
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
            t = fsdp.local(p) if t is None else t  # FSDP2: this rank's shard
            return t.numel() * t.element_size()
        row = {"rank": self.rank,
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "backbone_mib": round(sum(held(p) for p in model.backbone.parameters()) / 2**20, 2)}
        if self.device.type == "cuda":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return self.gather_objects([row])

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Restore this rank's optimizer state (as written by ``optimizer.state_dict()``). A ZeRO
        optimizer takes the list of every rank's partition and picks its own by rank."""
        if self.ds is not None:
            states = [None] * self.world_size
            states[self.rank] = state
            optimizer.load_state_dict(states)
        elif self.shard_owner:  # FSDP2: the saved shards back into DTensors shaped as the parameters
            from torch.distributed.tensor import DTensor
            params = [p for g in optimizer.param_groups for p in g["params"]]
            def back(v, p):  # global shape given: shards of a dim not divisible by N are uneven
                if not (torch.is_tensor(v) and fsdp.is_sharded(p) and v.dim() > 0):
                    return v
                return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride())
            state = {**state, "state": {i: {k: back(v, params[int(i)]) for k, v in s.items()}
                                        for i, s in state["state"].items()}}
            optimizer.load_state_dict(state)
        else:
            optimizer.load_state_dict(state)

    def optimizer_state(self, optimizer) -> dict:
        """This process's optimizer state as plain tensors (what ``load_optimizer_state`` takes):
        under FSDP2 each sharded moment is saved as this process's shard, loadable with
        ``weights_only=True`` (a DTensor is not)."""
        state = optimizer.state_dict()
        if not self.shard_owner:
            return state
        return {**state, "state": {i: {k: fsdp.local(v) if torch.is_tensor(v) else v for k, v in s.items()}
                                   for i, s in state["state"].items()}}

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        """Every trainable tensor whole (all processes must call: ZeRO-3 and FSDP2 gather)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.shard_owner:
            return {n: fsdp.whole(p).detach().cpu().clone() for n, p in named}
        with self.gathered([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}

    def load_trainable(self, model, state: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in named]
        if missing or unknown:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
        if any(fsdp.is_sharded(p) for p in named.values()):  # FSDP2: each process keeps its shard
            from torch.distributed.tensor import distribute_tensor
            with torch.no_grad():
                for n, t in state.items():
                    p = named[n]
                    p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements) if fsdp.is_sharded(p)
                            else t.to(p.dtype))
            return
        with self.gathered([named[n] for n in state], modifier_rank=0), torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t.to(named[n].dtype))


def end_processes() -> bool:
    """Close the process group at the end of a finished command: a barrier, so no rank leaves while
    another is still in a collective, then ``destroy_process_group``. Returns whether there was one.
    Even after it, gloo's and the TCP store's native threads are torn down with the process's static
    objects at interpreter exit, which aborts a rank now and then ("terminate called without an
    active exception", exit -6) after the run has written everything, and the launcher reports the
    whole run failed (seen on this 2-core machine under load: zero2 SFT, FSDP2 PPO and FSDP2 prefix
    SFT runs). So the command line leaves such a process with ``os._exit`` once its files are closed
    (``exit_now``). Not called on an error: a barrier there could wait for a rank that is stuck in a
    collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def exit_now(code: int) -> None:
    """Leave a finished multi-process command without running native static destructors (see
    ``end_processes``): Python's own streams and logging handlers are flushed and closed first, every
    run file was closed by its stage, and the kernel releases the run lock."""
    import logging
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def register_role_tensors(model) -> None:
    """Under ZeRO-3, make every adapter and head tensor of an ``AlignModel`` whole for each of its
    forwards (and backwards). ZeRO-3 partitions them like the backbone and gathers a parameter only
    around the forward of the module that owns it; but IA3's vectors, LLaMA-Adapter's prompts and
    gates and the prefix / prompt-tuning embeddings are read by hooks on backbone modules and by the
    attention function, never by calling their own module. Registered as external parameters of the
    model they are fetched when its forward starts and released when it ends: small next to the
    backbone, which is still fetched one module at a time."""
    import deepspeed
    for coll in (getattr(model, "adapters", None), getattr(model, "heads", None)):
        for p in ([] if coll is None else coll.parameters()):
            deepspeed.zero.register_external_parameter(model, p)


# ---------------------------------------------------------------- DeepSpeed settings from the stage
_PRECISION = {"float32": (False, False), "fp32": (False, False), "bfloat16": (True, False),
              "bf16": (True, False), "float16": (False, True), "fp16": (False, True)}  # -> (bf16, fp16)


def declared_deepspeed_config() -> tuple[dict, str]:
    """The DeepSpeed config as the user wrote it (the file accelerate launch was given, plus a
    ``gradient_clipping`` from the accelerate YAML), before accelerate fills its ``"auto"`` values
    (it sets bf16/fp16 from its own ``mixed_precision`` when the Accelerator is built), and where it
    came from, for messages."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {}, ""
    src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    declared: dict = {}
    if src != "none":
        from accelerate.utils.deepspeed import HfDeepSpeedConfig
        declared = json.loads(json.dumps(HfDeepSpeedConfig(src).config))  # a copy: path, dict or base64
    clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clip not in ("auto", "none", "") and declared.get("gradient_clipping", "auto") == "auto":
        declared["gradient_clipping"] = float(clip)
    return declared, (src if src != "none" else "the accelerate config's deepspeed_config")


def _flag(value):
    """A DeepSpeed ``enabled`` value: True/False, or None for "auto"/absent."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def deepspeed_settings(cfg: dict, *, dtype: str, max_grad_norm: float, declared: dict | None = None,
                       mixed_precision: str = "no", source: str = "the DeepSpeed config") -> dict:
    """Put the stage's settings into the DeepSpeed config ``cfg`` (in place; returned).

    * ``gradient_clipping`` = ``max_grad_norm`` (``train.max_grad_norm`` / ``ppo.max_grad_norm``;
      0 switches clipping off). A config that hard-codes another value is refused: set it to
      ``"auto"`` (the shipped configs do) or give the stage that value.
    * ``model.dtype`` is the one source of truth for precision: bfloat16 -> ``bf16.enabled``,
      float16 -> ``fp16.enabled``, float32 -> both off (DeepSpeed casts the whole module to the
      16-bit type it enables, and PPO decides from ``model.dtype`` whether to recompute the rollout
      log-probs). A config that hard-codes a conflicting ``enabled`` value, or accelerate's
      ``--mixed_precision`` naming another precision, is refused.

    ``declared`` is the config as written (``cfg`` itself when not given): accelerate has already
    replaced ``"auto"`` precision flags in ``cfg`` by then, so conflicts are judged on ``declared``.
    """
    declared = cfg if declared is None else declared
    if dtype not in _PRECISION:
        raise ValueError(f"model.dtype={dtype!r}: choose float32, bfloat16 or float16")
    clip = declared.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != float(max_grad_norm):
        raise ValueError(
            f"{source} sets gradient_clipping={clip} but the stage's max_grad_norm is {max_grad_norm} "
            f"(train.max_grad_norm, ppo.max_grad_norm for PPO; 0 = off): set gradient_clipping to \"auto\" "
            f"so the stage's value is used, or set max_grad_norm={clip}")
    cfg["gradient_clipping"] = float(max_grad_norm)
    want = dict(zip(("bf16", "fp16"), _PRECISION[dtype]))
    mp = {"bf16": "bf16", "fp8": "bf16", "fp16": "fp16"}.get(mixed_precision)
    if mp is not None and not want[mp]:
        raise ValueError(
            f"accelerate's mixed_precision={mixed_precision} but model.dtype={dtype}: under DeepSpeed "
            f"model.dtype decides the precision; drop --mixed_precision (or set it to no) and set "
            f"model.dtype={'bfloat16' if mp == 'bf16' else 'float16'} if that is the precision you want")
    for key, on in want.items():
        node = declared.get(key)
        written = _flag(node.get("enabled")) if isinstance(node, dict) else None
        if written is not None and written != on:
            raise ValueError(
                f"{source} sets {key}.enabled={str(written).lower()} but model.dtype={dtype} "
                f"({'needs it on' if on else 'needs it off'}): model.dtype decides the precision; set "
                f"{key}.enabled to \"auto\" in the DeepSpeed config, or change model.dtype")
        node = cfg.get(key) if isinstance(cfg.get(key), dict) else {}
        cfg[key] = {**node, "enabled": on}
    return cfg


def shared_fs_message(path, ranks: list[int], world_size: int) -> str:
    return (f"process(es) {ranks} of {world_size} cannot see {path}, the run directory that rank 0 "
            f"created: every process writes its optimizer shard and RNG state into the same "
            f"checkpoint directories, so on several nodes output_dir must be on a filesystem "
            f"shared by all nodes (NFS, Lustre, ...) at the same path")
