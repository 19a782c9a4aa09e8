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
    gradient_checkpointing: bool = False  # recompute backbone activations in backward (memory for time)


@dataclass
class TrainConfig:
    seed: int = 0                        # data order and initialisation; sampling adds rank * 100003 per process
    lr: float = 1e-3                     # peak learning rate (AdamW)
    weight_decay: float = 0.0            # AdamW weight decay (adapter tensors only)
    adam_eps: float = 1e-8               # AdamW epsilon
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    scheduler: str = "cosine"            # cosine | linear | constant
    warmup_steps: int = 0                # linear warm-up from 0
    epochs: float = 1.0                  # passes over the training set (fractions allowed)
    max_steps: int = 0                   # >0 overrides epochs
    batch_size: int = 8                  # per process, per micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    max_grad_norm: float = 1.0           # gradient clipping (0: off)
    log_every: int = 10                  # steps between logged training metrics
    eval_every: int = 0                  # 0: at the end only
    save_every: int = 0                  # 0: at the end only
    keep_checkpoints: int = 2            # most recent checkpoints kept in checkpoints/
    stop_after_steps: int = 0            # testing aid: stop (as if killed) after this many steps


@dataclass
class TrackingConfig:
    wandb: bool = True                   # false: metrics.jsonl only
    project: str = "align"               # W&B project
    group: Optional[str] = None          # stages of one pipeline share a group
    name: Optional[str] = None           # W&B run name (default: the stage)
    mode: Optional[str] = None           # online | offline | disabled; default offline without an API key
    tags: list = field(default_factory=list)  # W&B tags


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


def reference(cls) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every leaf of a config dataclass, the comment taken from
    the field's trailing ``# ...`` in the source: one source of truth for the README's reference."""
    import inspect
    import re
    import typing

    rows: list[tuple[str, str, str]] = []

    def comments(c) -> dict[str, str]:
        out, last, col = {}, None, -1
        for line in inspect.getsource(c).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            cont = re.match(r"\s+#\s*(.*)$", line)
            if m:
                out[m.group(1)], last, col = m.group(2).strip(), m.group(1), line.index("#")
            elif cont and last and line.index("#") == col:  # the comment continued in its column
                out[last] += " " + cont.group(1).strip()
            else:
                last = None
        return out

    def walk(c, prefix: str):
        notes = comments(c)
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            t = hints[f.name]
            inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
            sub = t if dataclasses.is_dataclass(t) else (inner[0] if inner else None)
            if sub is not None and f.default is not None:
                walk(sub, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ""
            if default is None:
                shown = "null"
            elif isinstance(default, str):
                shown = default if default else "''"
            elif isinstance(default, bool):
                shown = str(default).lower()
            else:
                shown = str(default)
            rows.append((prefix + f.name, shown, notes.get(f.name, "")))

    walk(cls, "")
    return rows


def reference_markdown(cls) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, note in reference(cls):
        note, default = note.replace("|", "\\|"), default.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {note} |")
    return "\n".join(lines) + "\n"
