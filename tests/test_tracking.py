"""W&B mode selection and the no-secrets rule: online only with a configured key, never a key in a
run dir."""
from __future__ import annotations

import pytest

from align.config import TrackingConfig
from align.tracking import Tracker, has_wandb_credentials


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_credentials_come_from_the_key_variable_or_wandb_login(clean_env, monkeypatch):
    assert not has_wandb_credentials()
    (clean_env / ".netrc").write_text("machine example.org\n  login user\n  password x\n")
    assert not has_wandb_credentials()
    (clean_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123abcd\n")
    (clean_env / ".netrc").chmod(0o600)
    assert has_wandb_credentials()
    (clean_env / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd")
    assert has_wandb_credentials()


def test_without_a_key_wandb_runs_offline_and_no_key_reaches_the_run_dir(clean_env, tmp_path, monkeypatch):
    for d in ("run", "run2"):
        (tmp_path / d).mkdir()
    t = Tracker(tmp_path / "run", TrackingConfig(wandb=True, project="align-test"), job_type="sft",
                config={"a": 1})
    assert t.wandb is not None and t.wandb.settings.mode == "offline"
    t.log({"loss": 1.0}, 1)
    t.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # an explicit WANDB_MODE wins over the default; a key in the environment is never written
    secret = "f" * 40
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    t = Tracker(tmp_path / "run2", TrackingConfig(wandb=True, project="align-test"), job_type="sft",
                config={"a": 1})
    assert t.wandb.settings.mode == "offline"
    t.log({"loss": 1.0}, 1)
    t.finish()
    for f in (tmp_path / "run2").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
