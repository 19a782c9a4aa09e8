"""Models and datasets by Hugging Face Hub id, read from the local Hugging Face cache and never the
network (align/hub.py), and ``align export --push-to-hub`` (its upload recorded, not sent).

The cache is a real huggingface_hub cache in a temporary directory: huggingface_hub has no call
that adds files to its cache without the network, so :func:`cache_repo` writes the layout its docs
describe (blobs named by hash, ``snapshots/<commit>/`` links, ``refs/<name>``), and every test that
uses it first has ``scan_cache_dir`` read the repository back."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants, scan_cache_dir

import align.stages.reward as reward
import align.stages.sft as sft
from align.backbone import checkpoint_fingerprint, resolve_checkpoint
from align.config import ConfigError, backbone_problems, load_config
from align.data.common import read_records
from align.export import ExportError, export, main as export_main, verify_export
from align.hub import HubId, model_record, parse_id
from tests.test_sft import sft_cfg, synthetic_instructions

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-org/tiny-llama"
C1 = hashlib.sha1(b"tiny-llama v1").hexdigest()
C2 = hashlib.sha1(b"tiny-llama v2").hexdigest()
D1 = hashlib.sha1(b"swap v1").hexdigest()


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs=("main",),
               repo_type: str = "model") -> Path:
    """``files`` in the Hugging Face cache ``cache`` as a download leaves them; the snapshot dir."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def folder_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (huggingface_hub's and datasets'), here and in subprocesses."""
    import datasets
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode off (so nothing but align's own cache-only lookups keeps the network away), and
    every name look-up or connection beyond this machine recorded and refused."""
    import datasets
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    local = ("127.0.0.1", "::1", "localhost", None)
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    tried = []

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            tried.append(address)
            raise OSError(f"test: network access to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            tried.append(host)
            raise socket.gaierror(f"test: name look-up of {host}")
        return real_getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return tried


@pytest.fixture
def hub_model(hf_cache, tiny_llama):
    """The tiny Llama as the cached Hub model tiny-org/tiny-llama: commit C1 on main and tag v1."""
    snap = cache_repo(hf_cache, MODEL, folder_files(tiny_llama), C1, refs=("main", "v1"))
    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert [rev.commit_hash for rev in repos[MODEL].revisions] == [C1]   # huggingface_hub reads it as a cache
    return snap


@pytest.fixture
def hub_dataset(hf_cache, tmp_path):
    """synthetic SFT records as the cached Hub dataset data-org/swap (train and test splits)."""
    rows = [json.loads(line) for line in synthetic_instructions(tmp_path / "d.jsonl", n=48).read_text().splitlines()]
    snap = cache_repo(hf_cache, "data-org/swap", {"data/train.jsonl": jsonl(rows[:40]),
                                                  "data/test.jsonl": jsonl(rows[40:])}, D1, repo_type="dataset")
    assert ("data-org/swap", "dataset") in {(r.repo_id, r.repo_type) for r in scan_cache_dir(hf_cache).repos}
    return rows, snap


def test_ids_are_told_from_paths_and_an_existing_path_always_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_id("org/name") == HubId("org/name")
    assert parse_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_id("org/name@refs/pr/1") == HubId("org/name", "refs/pr/1")
    assert parse_id("trl-lib/ultrafeedback_binarized:test", "dataset") == \
        HubId("trl-lib/ultrafeedback_binarized", None, "test", "dataset")
    assert parse_id("org/name", "dataset").split == "train"
    assert parse_id("org/name@abc:train[:10%]", "dataset") == HubId("org/name", "abc", "train[:10%]", "dataset")
    for path in ("/abs/model", "./org/name", "../org/name", "~/org/name", "a/b/c", "name", "org/name:train",
                 "org/weights.gguf", "C:\\models\\x", "C:/models/x", "org--x/name", "org/na..me"):
        assert parse_id(path) is None, path
    for path in ("data/train.jsonl", "org/x.parquet", "C:/data/train.jsonl", "C:\\data\\x:train", "org/x:tr ain"):
        assert parse_id(path, "dataset") is None, path
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    (tmp_path / "org" / "data:train").write_text(json.dumps({"prompt": "local", "completion": " file"}) + "\n")
    assert parse_id("org/name") is None and parse_id("org/data:train", "dataset") is None
    recs = read_records("org/data:train")     # a file whose name has a ':' is a file
    assert recs == [{"prompt": "local", "completion": " file"}] and recs[0].where == "org/data:train: line 1"


def test_an_existing_local_directory_wins_over_a_cached_id(hub_model, tiny_paths, tmp_path, monkeypatch):
    import shutil
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(MODEL) == hub_model
    local = tmp_path / MODEL
    shutil.copytree(tiny_paths["gpt2"], local)
    assert resolve_checkpoint(MODEL) == Path(MODEL)
    assert model_record(MODEL) == {"path": str(local.resolve())}


def test_sft_runs_on_a_hub_model_and_a_hub_dataset_and_records_the_commit(hub_model, hub_dataset, tiny_llama,
                                                                          tmp_path, no_network):
    rows, _ = hub_dataset
    out = sft.run(sft_cfg(tmp_path, (MODEL, "data-org/swap"), "data.eval=data-org/swap:test",
                          "train.max_steps=3", "train.eval_every=0", "data.num_samples=1"))
    assert out["train_examples"] == 40 and out["eval_examples"] == 8
    rec = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert rec["path"] == f"{MODEL}@{C1}" and rec["repo_id"] == MODEL and rec["revision"] == C1
    assert rec["requested"] == MODEL and rec["snapshot"] == str(hub_model)
    assert rec["fingerprint"] == checkpoint_fingerprint(tiny_llama)   # the same weight files, read through the cache
    peft_cfg = json.loads((tmp_path / "run" / "adapters" / "sft" / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == MODEL
    # later stages load the pinned id from the record
    assert backbone_problems("", str(tmp_path / "run")) == []
    assert resolve_checkpoint(rec["path"]) == hub_model
    peft = export(tmp_path / "run", tmp_path / "peft", fmt="peft")
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == (MODEL, C1)
    card = (export(tmp_path / "run", tmp_path / "hf") / "README.md").read_text()  # loads the backbone by its id
    assert card.startswith(f"---\nbase_model: {MODEL}\nlibrary_name: transformers\n")
    assert f"revision `{C1}`" in card and "data-org/swap:test" in card
    assert no_network == []


def test_a_revision_is_resolved_through_the_cache_refs(hub_model, hf_cache, tiny_llama):
    cache_repo(hf_cache, MODEL, folder_files(tiny_llama), C2, refs=("v2",))
    assert resolve_checkpoint(f"{MODEL}@v1") == hub_model
    assert resolve_checkpoint(f"{MODEL}@{C1}") == hub_model
    rec = model_record(f"{MODEL}@v2")
    assert rec["path"] == f"{MODEL}@{C2}" and rec["revision"] == C2 and rec["requested"] == f"{MODEL}@v2"


def test_ids_not_in_the_cache_are_refused_before_anything_is_written(hf_cache, tmp_path, tiny_llama):
    data = synthetic_instructions(tmp_path / "d.jsonl", n=8)

    def refused(model, train, *match):
        cfg = sft_cfg(tmp_path, (model, train), name="out")
        with pytest.raises(ConfigError) as e:
            sft.run(cfg)
        for m in match:
            assert m in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()
    get = f"is not in the local cache {hf_cache}"
    refused(MODEL, data, f"model.path={MODEL!r}: no such file or directory, and the Hugging Face Hub model {MODEL} "
            + get, f"`hf download {MODEL}`", "HF_HUB_CACHE", "never from the network")
    refused(tiny_llama, "data-org/swap:train", "data.train='data-org/swap:train': no such file or directory, and the "
            "Hugging Face Hub dataset data-org/swap " + get, "`hf download data-org/swap --repo-type dataset`")
    cache_repo(hf_cache, MODEL, folder_files(tiny_llama), C1)
    refused(f"{MODEL}@v9", data, f"the Hugging Face Hub model {MODEL} at v9 {get}", "--revision v9")
    cache_repo(hf_cache, "tiny-org/partial", {"config.json": (tiny_llama / "config.json").read_bytes()}, C1)
    refused("tiny-org/partial", data, "has no safetensors weights", "partial download")
    refused(str(tmp_path / "nowhere"), data, "model.path=", "no such file or directory")


def test_the_command_line_names_both_missing_ids_and_exits_2(hf_cache, tmp_path):
    r = subprocess.run([sys.executable, "-m", "align.cli", "sft", f"output_dir={tmp_path / 'x'}",
                        f"model.path={MODEL}", "data.train=data-org/swap:train", "tracking.wandb=false"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert "2 problems" in r.stderr and f"Hub model {MODEL} is not in the local cache {hf_cache}" in r.stderr
    assert "Hub dataset data-org/swap is not in the local cache" in r.stderr
    assert not (tmp_path / "x").exists()


def test_hub_dataset_rows_are_checked_like_a_files_records(hub_model, hf_cache, tmp_path, no_network):
    pairs = [{"prompt": "p1", "chosen": " good", "rejected": " bad"}, {"prompt": "p2", "chosen": " only"},
             {"prompt": "p3", "chosen": " a", "rejected": " b"}]
    cache_repo(hf_cache, "data-org/prefs", {"data/train.jsonl": jsonl(pairs)}, D1, repo_type="dataset")
    recs = read_records("data-org/prefs")
    assert [r.where for r in recs] == [f"data-org/prefs:train: row {i}" for i in (1, 2, 3)]
    assert recs[0] == pairs[0] and recs[1] == pairs[1]   # the column row 2 lacks is left out, not None
    cfg = load_config(reward.RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", "init=base", f"model.path={MODEL}", "data.train=data-org/prefs:train",
        "tracking.wandb=false"])
    with pytest.raises(ValueError, match=r"data-org/prefs:train: row 2: missing field 'rejected'"):
        reward.run(cfg)
    assert not (tmp_path / "rm").exists()
    with pytest.raises(ValueError, match=r"data-org/prefs:validation: Unknown split \"validation\""):
        read_records("data-org/prefs:validation")
    assert read_records("data-org/prefs:train[:1]") == pairs[:1]
    assert no_network == []


class RecordingApi:
    """huggingface_hub.HfApi as the tests see it: every call recorded, with the files the upload
    would send (after its ignore patterns), and nothing sent."""
    calls: list = []
    fail = False

    def __init__(self, *args, **kwargs):
        RecordingApi.calls.append(("HfApi", args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        if RecordingApi.fail:
            raise OSError("503 Service Unavailable")
        sent = sorted(p.name for p in Path(folder_path).iterdir()
                      if not any(fnmatch.fnmatch(p.name, pat) for pat in ignore_patterns or ()))
        RecordingApi.calls.append(("upload_folder", repo_id, folder_path, sent))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123")


@pytest.fixture
def recording_api(monkeypatch, no_network):
    RecordingApi.calls, RecordingApi.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret_token")
    return RecordingApi


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_push_to_hub_uploads_the_complete_verified_export(tiny_llama, tmp_path, recording_api, capsys, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.adapters import AdapterConfig
    from tests.test_export import make_run
    run, _, _ = make_run(tmp_path, tiny_llama, {"policy": AdapterConfig(method="lora")})
    out = tmp_path / "exp"
    rc = export_main([str(run), "--out", str(out), "--format", fmt, "--push-to-hub", "me/tiny-policy", "--private"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    (_, _, init), (_, repo, kw), (_, repo2, folder, sent) = recording_api.calls
    assert (repo, kw["private"], kw["exist_ok"], repo2, Path(folder)) == ("me/tiny-policy", True, True,
                                                                          "me/tiny-policy", out)
    want = {"hf": {"README.md", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json"},
            "peft": {"README.md", "adapter_config.json", "adapter_model.safetensors"}}[fmt]
    assert want <= set(sent) and ".align-export.json" not in sent
    assert set(sent) == set(verify_export(out))      # what the export wrote, every file of it
    assert "uploaded" in printed.out and "me/tiny-policy/commit/0123" in printed.out
    assert "hf_test_secret_token" not in printed.out + printed.err and init == {}
    if fmt == "hf":   # the uploaded folder is a checkpoint transformers loads whole
        AutoModelForCausalLM.from_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(out))


def test_push_to_hub_refusals_and_a_failed_upload(tiny_llama, tmp_path, recording_api, capsys):
    from align.adapters import AdapterConfig
    from tests.test_export import make_run
    run, _, _ = make_run(tmp_path, tiny_llama, {"policy": AdapterConfig(method="lora")})
    assert export_main([str(run), "--out", str(tmp_path / "a"), "--push-to-hub", "not a/repo//id"]) == 1
    assert "--push-to-hub not a/repo//id: not a Hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and recording_api.calls == []
    with pytest.raises(SystemExit):
        export_main([str(run), "--out", str(tmp_path / "a"), "--private"])
    recording_api.fail = True
    assert export_main([str(run), "--out", str(tmp_path / "b"), "--format", "peft", "--push-to-hub", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "was written, but uploading it to me/x failed: OSError: 503" in err and (tmp_path / "b").is_dir()
    (tmp_path / "b" / "adapter_config.json").unlink()
    with pytest.raises(ExportError, match="incomplete .*adapter_config.json"):
        verify_export(tmp_path / "b")
