"""Stage configs: dataclasses filled from YAML plus dotted command-line overrides.

OmegaConf does the loading, merging and type checking; this module only turns its errors into
messages that name the file and the key, and checks paths before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.adapters.base import AdapterConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: str = ""                       # a HF model directory (or a run dir's backbone reference)
    dtype: str = "float32"               # float32 | bfloat16 | float16
    trust_remote_code: bool = False      # never on unless asked
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig:
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"            # cosine | linear | constant
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int = 0                   # >0 overrides epochs
    batch_size: int = 8                  # per process, per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 0                  # 0: at the end only
    save_every: int = 0                  # 0: at the end only
    keep_checkpoints: int = 2
    stop_after_steps: int = 0            # testing aid: stop (as if killed) after this many steps


@dataclass
class TrackingConfig:
    wandb: bool = True
    project: str = "align"
    group: Optional[str] = None          # stages of one pipeline share a group
    name: Optional[str] = None
    mode: Optional[str] = None           # online | offline | disabled; default offline without an API key
    tags: list = field(default_factory=list)


def load_config(cls, path: str | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build ``cls`` from ``path`` (YAML) and ``overrides`` (``a.b=value``), strictly."""
    where = str(path) if path else "defaults"
    try:
        merged = OmegaConf.structured(cls)
        if path:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        where = "command-line overrides"
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid config key {key!r}: {msg}") from None
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def require_file(path: str, key: str) -> Path:
    p = Path(path)
    if not path or not p.exists():
        raise ConfigError(f"{key}: path {path!r} does not exist")
    return p


__all__ = ["AdapterConfig", "ModelConfig", "TrainConfig", "TrackingConfig", "ConfigError",
           "load_config", "save_config", "to_dict", "require_file"]
