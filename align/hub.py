"""Models and datasets by Hugging Face Hub id, read from the local Hugging Face cache only.

``model.path`` may be a Hub model id, ``org/name`` or ``org/name@revision`` (a branch, tag or
commit), and a stage's records file (``data.train``, ``data.prompts``, ...) a Hub dataset id,
``org/name``, ``org/name:split`` or ``org/name@revision:split`` (split ``train`` when none is
given; datasets' slices such as ``train[:1000]`` work too). A path that exists always wins: text
is taken for an id only when nothing is on disk there and it has that form (one ``/``, no file
suffix such as ``.jsonl``).

An id is looked up with huggingface_hub's cache API (``snapshot_download(...,
local_files_only=True)``, ``scan_cache_dir``) in its cache (``HF_HUB_CACHE``), never over the
network, whatever ``HF_HUB_OFFLINE`` says; ``hf download`` on a machine with network puts it there.
A model snapshot must hold ``config.json`` and safetensors weights; a run records the id, the
commit it resolved to and the weights' fingerprint (:func:`model_record`). A dataset is read with
``datasets.load_dataset`` from the snapshot's files, and its rows go through the same checks as a
file's, each named ``org/name:split: row N``.

``align export --push-to-hub`` uploads a finished export with huggingface_hub (:func:`push_folder`).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from align.data.records import Record
from align.rules import Exists, Rule

_REPO = r"(?P<repo>[^/@:\s]+/[^/@:\s]+)(?:@(?P<rev>[^:@\s]+))?"
_MODEL_ID = re.compile(rf"^{_REPO}$")
_DATASET_ID = re.compile(rf"^{_REPO}(?::(?P<split>[\w.-]+(?:\[[^\]]*\])?))?$")
# text naming a file is a missing file, never an id
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".gguf", ".safetensors", ".bin")
NO_PATH = "no such file or directory"


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None     # as given (branch, tag or commit); None: the default branch
    split: str | None = None        # datasets only
    repo_type: str = "model"        # model | dataset

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.split}" if self.split else "")

    def download_command(self) -> str:
        kind = " --repo-type dataset" if self.repo_type == "dataset" else ""
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id}{kind}{rev}"


class NotCached(FileNotFoundError):
    """A Hub id whose snapshot is not, or not wholly, in the local Hugging Face cache."""


def hub_cache() -> str:
    """huggingface_hub's cache directory (``HF_HUB_CACHE``, else under ``HF_HOME``)."""
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def parse_id(text, repo_type: str = "model") -> HubId | None:
    """``text`` as a Hub id of ``repo_type`` (model | dataset); None when a path exists there or
    ``text`` does not have that form (a missing relative path with one ``/`` does: the message for
    it then says both)."""
    text = str(text or "")
    if not text or Path(text).expanduser().exists() or text.lower().endswith(FILE_SUFFIXES):
        return None
    m = (_DATASET_ID if repo_type == "dataset" else _MODEL_ID).match(text)
    if m is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    split = (m["split"] or "train") if repo_type == "dataset" else None
    return HubId(m["repo"], m["rev"], split, repo_type)


def snapshot(ref: HubId) -> Path:
    """The cached snapshot directory of ``ref`` (huggingface_hub resolves a branch or tag through
    the cache's refs), or ``NotCached`` saying where it looked and how to get it there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
    what = f"the Hugging Face Hub {ref.repo_type} {ref.repo_id}" + (f" at {ref.revision}" if ref.revision else "")
    get = (f"run `{ref.download_command()}` on a machine with network and bring its cache here, or set "
           f"HF_HUB_CACHE to a cache that holds it")
    try:
        return Path(snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                      cache_dir=hub_cache(), local_files_only=True))
    except IncompleteSnapshotError as e:
        raise NotCached(f"{what} is only partly in the local cache {hub_cache()} ({e}); {get}") from None
    except LocalEntryNotFoundError:
        raise NotCached(f"{what} is not in the local cache {hub_cache()} (align reads Hub ids from the cache "
                        f"only, never from the network); {get}") from None


def commit_of(ref: HubId, snap: Path) -> str | None:
    """The commit hash of the cached snapshot ``snap`` of ``ref`` (huggingface_hub's cache scan)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        info = scan_cache_dir(hub_cache())
    except (CacheNotFound, OSError):
        return None
    target = snap.resolve()
    for repo in info.repos:
        if repo.repo_id == ref.repo_id and repo.repo_type == ref.repo_type:
            for rev in repo.revisions:
                if Path(rev.snapshot_path).resolve() == target:
                    return rev.commit_hash
    return None


# ------------------------------------------------------------------------------------ models
def model_snapshot(ref: HubId) -> Path:
    """The cached snapshot of the model ``ref``, checked to hold what a load reads: ``config.json``
    and safetensors weights (every shard an index names). align loads no pickled weights from the
    Hub, and never runs a repository's code unless ``model.trust_remote_code`` says so."""
    snap = snapshot(ref)
    missing = [] if (snap / "config.json").is_file() else ["config.json"]
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise NotCached(f"{ref}: the cached {index} is unreadable ({e})") from None
        missing += [s for s in shards if not (snap / s).is_file()]
    elif not any(snap.glob("*.safetensors")):
        ggufs = sorted(p.name for p in snap.glob("*.gguf"))
        if ggufs:
            raise NotCached(f"{ref}: the cached snapshot {snap} holds GGUF files ({', '.join(ggufs[:3])}) and no "
                            f"safetensors checkpoint; give one GGUF file's path as model.path")
        missing.append("safetensors weights (align loads Hub checkpoints in safetensors only)")
    if missing:
        raise NotCached(f"{ref}: the cached snapshot {snap} has no {', '.join(missing)}; a partial download? "
                        f"(`{ref.download_command()}` on a machine with network fetches the whole repository)")
    return snap


def model_problem(text) -> str | None:
    """What is wrong with ``model.path`` = ``text`` (None: a local path, or a cached Hub model)."""
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    ref = parse_id(text)
    if ref is None:
        return NO_PATH
    try:
        model_snapshot(ref)
    except NotCached as e:
        return f"{NO_PATH}, and {e}"
    return None


def resolve_model(text) -> Path:
    """The snapshot directory of the Hub model id ``text``; FileNotFoundError naming ``model.path``
    when ``text`` is no id or is not cached (a path that exists is the caller's)."""
    ref = parse_id(text)
    if ref is None:
        raise FileNotFoundError(f"model.path: {str(text)!r} does not exist")
    try:
        return model_snapshot(ref)
    except NotCached as e:
        raise NotCached(f"model.path: {str(text)!r}: {NO_PATH}, and {e}") from None


def model_record(text) -> dict:
    """What a run records of the backbone ``text``: a local path, made absolute; a Hub id pinned to
    the commit its cached snapshot is (``path`` ``org/name@<commit>``, which later stages load),
    with ``repo_id``, ``revision`` (that commit), the ``requested`` id and the ``snapshot`` dir."""
    ref = parse_id(text)
    if ref is None:
        return {"path": str(Path(str(text)).expanduser().resolve())}
    snap = model_snapshot(ref)
    commit = commit_of(ref, snap)
    return {"path": f"{ref.repo_id}@{commit}" if commit else str(ref), "repo_id": ref.repo_id,
            "revision": commit, "requested": str(ref), "snapshot": str(snap)}


def local_model_path(text) -> Path:
    """Where the backbone ``text`` is on disk: the path itself, or a Hub id's cached snapshot."""
    ref = parse_id(text)
    return Path(str(text)) if ref is None else model_snapshot(ref)


class ModelPath(Rule):
    """``model.path``: a Hugging Face model directory or ``.gguf`` file on disk, or a Hub model id
    in the local cache ('' means unset)."""

    def problem(self, value) -> str | None:
        return None if value in ("", None) else model_problem(value)


# ------------------------------------------------------------------------------------ datasets
def records_problem(text) -> str | None:
    """What is wrong with a records source ``text`` that is not on disk (None: a cached Hub dataset)."""
    ref = parse_id(text, "dataset")
    if ref is None:
        return NO_PATH
    try:
        snapshot(ref)
    except NotCached as e:
        return f"{NO_PATH}, and {e}"
    return None


class RecordsPath(Exists):
    """A records file or ``datasets`` directory on disk (``Exists``), or a Hub dataset id in the
    local cache (``org/name[@revision][:split]``)."""

    def problem(self, value) -> str | None:
        if value in ("", None) or Path(str(value)).exists():
            return super().problem(value)
        return records_problem(value)


@contextlib.contextmanager
def _quiet_datasets():
    import datasets
    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_on:
            datasets.enable_progress_bars()


def read_dataset(text) -> list[Record] | None:
    """The rows of the Hub dataset id ``text`` (None when ``text`` is no id), read with
    ``datasets.load_dataset`` from its cached snapshot, each a ``Record`` named
    ``org/name:split: row N``; a field a row does not have (None in the table) is left out."""
    ref = parse_id(text, "dataset")
    if ref is None:
        return None
    snap = snapshot(ref)
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(str(snap), split=ref.split)
        except FileNotFoundError as e:   # no data files datasets can read
            raise ValueError(f"{ref}: datasets finds no data in the cached snapshot {snap} ({e})") from None
        except ValueError as e:          # an unknown split
            raise ValueError(f"{ref}: {e}") from None
    # a table has every column in every row: a field a row lacks reads None there, and is left out
    # as a JSONL record would leave it out, so a missing field is named as in a file
    return [Record({k: v for k, v in r.items() if v is not None}, f"{ref}: row {i}") for i, r in enumerate(ds, 1)]


# ------------------------------------------------------------------------------------ upload
def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> None:
    """Refuse a repository name the Hub would refuse, before anything is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{option} {repo_id}: not a Hub repository id ({e})") from None


def push_folder(folder: Path, repo_id: str, private: bool = False, ignore: tuple[str, ...] = ()) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created when missing, private with
    ``private``) with huggingface_hub's ``HfApi``; the token is huggingface_hub's own (``HF_TOKEN``
    or ``hf auth login``), never read or printed here. Returns the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=list(ignore) or None,
                             commit_message=f"Upload {folder.name} exported by align")
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
