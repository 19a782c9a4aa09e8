"""What every stage does the same way: run directory, config record, runtime, backbone, tracker."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from align.rundir import RunDir
from align.backbone import load_backbone, load_tokenizer, resolve_checkpoint
from align.checkpoint import check_resumable, find_checkpoint, set_aside
from align.config import ConfigError, save_config, to_dict
from align.distributed import Runtime
from align.guard import FinishedRun, acquire, finished_summary
from align.hub import model_problem, model_record
from align.model import AlignModel
from align.quantization import sharded_quantization_problem
from align.tracking import Tracker


@dataclass
class Stage:
    run_dir: Path
    rt: Runtime
    tokenizer: object
    model: AlignModel
    tracker: Tracker
    backbone_path: str
    resume_step: int | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def backbone_from_run(run_dir: str | Path) -> dict:
    """The backbone record (path, fingerprint) a previous stage's run dir was trained on."""
    return RunDir(run_dir).backbone()


def _resume_point(cfg, job_type: str, run_dir: Path):
    """(the checkpoint to resume from or None, the newer ones that failed verification, whether the
    directory holds a run) for a run
    directory, refusing what would lose a run: a run there without resume=true, or resume=true on
    checkpoints none of which verifies. A finished run resumed raises ``FinishedRun``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file; give a directory")
    if not RunDir(run_dir).config.exists():
        return None, [], False
    if not cfg.resume:
        raise ConfigError(f"output_dir {run_dir} already holds a run; pass resume=true to continue "
                          f"it or choose another output_dir")
    summary = finished_summary(run_dir)
    if summary is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"[{job_type}] {run_dir} holds a finished run: nothing to resume, summary.json kept")
        raise FinishedRun(summary)
    ckpt, skipped = find_checkpoint(run_dir)
    if ckpt is None and skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise ConfigError(f"resume=true: no checkpoint in {run_dir / 'checkpoints'} verifies ({reasons}); nothing "
                          f"was changed: move them away to start over, or choose another output_dir")
    return ckpt, skipped, True


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir} is not writable")


def start_stage(cfg, job_type: str, backbone_path: str) -> Stage:
    run_dir = Path(cfg.output_dir)
    if not backbone_path or (problem := model_problem(backbone_path)) == "no such file or directory":
        raise ConfigError(f"model.path: backbone {backbone_path!r} does not exist")
    if problem is not None:
        raise ConfigError(f"model.path={backbone_path!r}: {problem}")
    ckpt, skipped, holds_run = _resume_point(cfg, job_type, run_dir)
    resume_step = json.loads((ckpt / "state.json").read_text())["step"] if ckpt is not None else None
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    rt = Runtime(grad_accum=cfg.train.grad_accum, seed=cfg.train.seed)
    if (problem := sharded_quantization_problem(cfg.model.quantization, rt)) is not None:
        raise ConfigError(problem)  # before the run directory is written, on every process
    if resume_step is not None:  # another number of processes is refused before anything is written
        check_resumable(ckpt, rt.world_size)
    if rt.is_main:
        _make_run_dir(run_dir)
        acquire(run_dir, fresh)   # one run per directory, for the life of this one
        if ckpt is not None:  # latest -> the verified checkpoint, which prepare_resumable then reads
            set_aside(run_dir, [name for name, _ in skipped], ckpt)
            if skipped:
                rt.print(f"[{job_type}] resuming from {ckpt.name}; skipped "
                         + "; ".join(f"{name} ({why}, kept as checkpoints/bad_{name})" for name, why in skipped))
        elif holds_run:
            rt.print(f"[{job_type}] resume=true: {run_dir} has no checkpoint yet; starting over at step 0 "
                     f"(a run is replayed exactly from its seed)")
        resolve_checkpoint(backbone_path)  # a GGUF file is converted once, by one process
        save_config(cfg, RunDir(run_dir).config)
    rt.barrier()
    rt.check_shared_dir(run_dir)  # on several nodes: output_dir on a shared filesystem, or a clear error
    seed_everything(cfg.train.seed)
    rt.gather_for_generation = cfg.model.zero3_gather_for_generation
    if rt.zero_stage == 3 and not cfg.model.gradient_checkpointing:
        rt.print("[align] ZeRO-3 without model.gradient_checkpointing: autograd keeps the backbone weights each "
                 "layer gathered in the forward alive until the backward, so a training step holds the whole "
                 "frozen backbone on every process; set model.gradient_checkpointing=true to keep it partitioned")
    tok, model = load_model(backbone_path, cfg.model, rt.device,
                            chat_template=getattr(getattr(cfg, "data", None), "chat_template", None))
    if rt.is_main:
        RunDir(run_dir).backbone_record.write_text(json.dumps(   # a Hub id: pinned to its commit
            {**model_record(backbone_path), "fingerprint": model.fingerprint,
             "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
             "num_params": model.backbone_num_params()}, indent=2))
    tracker = Tracker(run_dir, cfg.tracking, job_type=job_type, config=to_dict(cfg),
                      is_main=rt.is_main, resume_step=resume_step)
    return Stage(run_dir, rt, tok, model, tracker, backbone_path, resume_step)


def load_model(backbone_path: str, model_cfg, device, chat_template: str | None = None):
    """The one loader every command uses: tokenizer (with its Specials) and ``AlignModel`` on
    ``device`` in ``model_cfg.dtype`` (its Linear weights int8 / nf4 with ``model_cfg.quantization``),
    ``trust_remote_code`` only when asked, gradient checkpointing when configured."""
    tok = load_tokenizer(backbone_path, trust_remote_code=model_cfg.trust_remote_code, chat_template=chat_template)
    backbone = load_backbone(backbone_path, model_cfg.dtype, device, model_cfg.trust_remote_code, tok,
                             quantization=getattr(model_cfg, "quantization", "none"))
    model = AlignModel(backbone, attn_implementation=getattr(model_cfg, "attn_implementation", "sdpa"))
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return tok, model


def write_summary(stage: Stage, summary: dict) -> None:
    if stage.rt.is_main:
        RunDir(stage.run_dir).summary_file.write_text(json.dumps(summary, indent=2, sort_keys=True))
    stage.tracker.summary(summary)


def finish_stage(stage: Stage, summary: dict, adapter_set: str) -> dict:
    """The end of every stage: summary.json and the W&B summary, ``adapters/<adapter_set>`` as a
    W&B artifact, the W&B run closed. ``summary["memory"]``: each process's peak memory and the
    backbone bytes it holds (``Runtime.memory_report``)."""
    summary = {**summary, "memory": stage.rt.memory_report(stage.model)}
    write_summary(stage, summary)
    stage.tracker.log_artifact(RunDir(stage.run_dir).adapter(adapter_set), f"{adapter_set}-adapters", "adapter")
    stage.tracker.finish()
    return summary
