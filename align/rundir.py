"""A stage's run directory, its layout named in one place.

    config.yaml        the full config the run was started with
    backbone.json      the frozen backbone: path, fingerprint, dtype, quantization, size
    adapters/<set>/    each adapter set the run trained (peft layout where peft has the method)
    heads/<name>/      each scalar head (reward, value)
    roles.json         the run's roles: for each, its adapter stack (set name and directory, relative
                       to the run or absolute) and head, and the reward's normalisation statistics
    checkpoints/       exact-resume checkpoints (align/checkpoint.py) and the ``latest`` pointer
    metrics.jsonl      logged metrics; samples.jsonl: logged samples
    summary.json       written last: a run with it is finished

Stages, evaluation, export and the pipeline ask a :class:`RunDir` for these paths instead of
joining strings. Runs written before ``roles.json`` held every role kept the reward's record in
``reward_role.json`` and a DPO policy's in ``policy_role.json``; :meth:`RunDir.roles` still reads
them.
"""
from __future__ import annotations

import json
from pathlib import Path

from align.rules import ConfigError

ROLES = "roles.json"
_LEGACY_ROLES = {"reward": "reward_role.json", "policy": "policy_role.json"}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- the layout
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def backbone_record(self) -> Path:
        return self.path / "backbone.json"

    @property
    def roles_record(self) -> Path:
        return self.path / ROLES

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    def adapter(self, name: str) -> Path:
        return self.path / "adapters" / name

    def head(self, name: str) -> Path:
        return self.path / "heads" / name

    def resolve(self, entry_dir: str) -> Path:
        """A directory a roles record names: absolute, or relative to this run."""
        d = Path(entry_dir)
        return d if d.is_absolute() else self.path / d

    # ---- records
    def backbone(self) -> dict:
        """The backbone record (path, fingerprint, ...); a ConfigError when the run has none."""
        if not self.backbone_record.exists():
            raise ConfigError(f"{self.path} is not a finished align run directory (no backbone.json)")
        return json.loads(self.backbone_record.read_text())

    def roles(self) -> dict:
        """Every role the run recorded: ``{role: {"adapters": [{"name", "dir"}], "head"?: dir,
        "normalisation"?: {...}}}`` (a run from before roles.json: its reward or policy record)."""
        if self.roles_record.exists():
            return json.loads(self.roles_record.read_text())
        return {role: json.loads((self.path / f).read_text())
                for role, f in _LEGACY_ROLES.items() if (self.path / f).exists()}

    def role(self, name: str) -> dict | None:
        return self.roles().get(name)

    def roles_file(self) -> Path:
        """The file that holds the roles (roles.json, or a legacy record), for messages."""
        if self.roles_record.exists():
            return self.roles_record
        return next((self.path / f for f in _LEGACY_ROLES.values() if (self.path / f).exists()), self.roles_record)

    def write_roles(self, roles: dict) -> None:
        self.roles_record.write_text(json.dumps(roles, indent=2))

    def summary(self) -> dict | None:
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None
