"""Metrics to ``metrics.jsonl`` (always) and Weights & Biases (by default, offline without a key).

The W&B mode is ``tracking.mode``, else ``WANDB_MODE``, else online when a W&B key is configured
(``WANDB_API_KEY`` or ``wandb login``) and offline otherwise. Only the main process logs. The W&B
run id is kept in the run dir so a resumed run continues the same W&B run; on resume, metric
lines past the resumed step are dropped so ``metrics.jsonl`` equals that of an uninterrupted run. Nothing from the environment (API keys) is logged.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from align.config import TrackingConfig
from align.rundir import RunDir


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def has_wandb_credentials() -> bool:
    """Whether W&B could log online: ``WANDB_API_KEY`` is set, or ``wandb login`` stored a key in
    ~/.netrc. The key itself is never read into align's configs, logs or run dirs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
                                            .split("://")[-1].rstrip("/"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


class Tracker:
    def __init__(self, run_dir: Path, cfg: TrackingConfig, *, job_type: str, config: dict,
                 is_main: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = RunDir(self.run_dir).metrics
        self.samples_path = RunDir(self.run_dir).samples
        self.wandb = None
        if not is_main:
            return
        for path in (self.metrics_path, self.samples_path):
            self._truncate(path, resume_step)
        if cfg.wandb and cfg.mode != "disabled":
            import wandb
            mode = cfg.mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.project, group=cfg.group, job_type=job_type, name=cfg.name or job_type,
                tags=list(cfg.tags), config=config, dir=str(self.run_dir), mode=mode,
                id=run_id, resume="allow", settings=wandb.Settings(console="off"))

    @staticmethod
    def _truncate(path: Path, resume_step: int | None) -> None:
        if not path.exists():
            return
        if resume_step is None:
            path.unlink()
            return
        keep = [ln for ln in path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        rec = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def log_samples(self, name: str, rows: list[dict], step: int) -> None:
        """Sample texts: appended to samples.jsonl and logged as a W&B table."""
        if not self.is_main or not rows:
            return
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "table": name, **r}, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            import wandb
            cols = list(rows[0])
            self.wandb.log({name: wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                           step=step)

    def log_artifact(self, path: Path, name: str, type_: str) -> None:
        if not self.is_main or self.wandb is None:
            return
        import wandb
        art = wandb.Artifact(name=name, type=type_)
        art.add_dir(str(path))
        self.wandb.log_artifact(art)

    def summary(self, values: dict) -> None:
        if self.is_main and self.wandb is not None:
            self.wandb.summary.update({k: _jsonable(v) for k, v in values.items()})

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
