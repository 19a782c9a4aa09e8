"""Saving and loading adapter sets and heads.

An adapter directory holds:

* ``adapter_model.safetensors``: the tensors; peft's key layout for methods HF peft has, so
  ``peft.PeftModel.from_pretrained(base, dir)`` loads it. Its metadata carries the backbone
  fingerprint (peft ignores metadata).
* ``adapter_config.json``: peft's config, only for methods peft has.
* ``align_adapter.json``: align's own record: method, full config, backbone fingerprint.

A directory written by peft alone (no ``align_adapter.json``) is imported from its peft config.
Only safetensors are read or written (docs/invariants.md #5).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from align.adapters.base import METHODS, AdapterConfig, held_state_dict, peft_types
from align.checkpoint import save_safetensors

ALIGN_FILE = "align_adapter.json"
PEFT_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class FingerprintMismatch(ValueError):
    pass


def atomic_dir(final: Path):
    """Context: write into a temp dir beside ``final``, then swap it into place."""
    class _Ctx:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(self.tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False
    return _Ctx()


def _contiguous(sd):
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_adapter(model, name: str, directory: str | os.PathLike, backbone_name: str = "") -> Path:
    """Write adapter set ``name`` of ``model`` (an AlignModel) to ``directory`` atomically."""
    aset = model.adapters[name]
    directory = Path(directory)
    meta = {"format": "pt", "align_method": aset.method, "align_fingerprint": model.fingerprint}
    with atomic_dir(directory) as tmp:
        save_safetensors(_contiguous(aset.export_state_dict()), tmp / WEIGHTS, metadata=meta)
        peft_cfg = aset.peft_config()
        if peft_cfg is not None:
            peft_cfg = {**peft_cfg, **peft_base(backbone_name)}
            (tmp / PEFT_CONFIG).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True))
        record = {"method": aset.method, "config": aset.saved_config().to_dict(),
                  "backbone_fingerprint": model.fingerprint, "backbone": backbone_name,
                  "num_params": aset.num_params()}
        (tmp / ALIGN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return directory


def peft_base(backbone: str) -> dict:
    """peft's name of the base model: the path as given, or for a Hub id ``org/name@rev`` (not a
    path on disk) the repository and its ``revision``, as peft loads them."""
    from align.hub import parse_id
    ref = parse_id(backbone) if backbone else None
    if ref is None:
        return {"base_model_name_or_path": backbone or None}
    return {"base_model_name_or_path": ref.repo_id, **({"revision": ref.revision} if ref.revision else {})}


def check_fingerprint(saved: str | None, model, what: str) -> None:
    if saved is None:
        warnings.warn(f"{what} records no backbone fingerprint (written by another tool?); "
                      f"cannot check it was trained on this backbone", stacklevel=3)
    elif saved != model.fingerprint:
        raise FingerprintMismatch(
            f"{what} was trained on backbone {saved}, but the loaded backbone is {model.fingerprint}. "
            f"Adapters only work on the exact backbone they were trained on; load that backbone "
            f"(see the run's config.yaml) or retrain.")


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, str | None]:
    directory = Path(directory)
    if (directory / ALIGN_FILE).exists():
        rec = json.loads((directory / ALIGN_FILE).read_text())
        return AdapterConfig(**rec["config"]), rec.get("backbone_fingerprint")
    if (directory / PEFT_CONFIG).exists():
        p = json.loads((directory / PEFT_CONFIG).read_text())
        method = peft_types().get(p.get("peft_type"))
        if method is None or method not in METHODS:
            raise ValueError(f"{directory / PEFT_CONFIG}: peft_type {p.get('peft_type')!r} is not supported")
        return METHODS[method].config_from_peft(p), None
    raise FileNotFoundError(f"{directory}: neither {ALIGN_FILE} nor {PEFT_CONFIG} found")


def load_adapter(model, name: str, directory: str | os.PathLike, trainable: bool = False):
    """Add adapter set ``name`` to ``model`` from ``directory`` (align or peft layout)."""
    directory = Path(directory)
    config, fp = read_adapter_config(directory)
    weights = directory / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found (only safetensors adapters are loaded)")
    check_fingerprint(fp, model, f"adapter {directory}")
    aset = model.add_adapter(name, config)
    sd = load_file(weights)
    aset.import_state_dict({k: v.to(next(aset.parameters()).dtype) for k, v in sd.items()})
    aset.requires_grad_(trainable)
    return aset


def save_head(model, name: str, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    directory = Path(directory)
    head = model.heads[name]
    with atomic_dir(directory) as tmp:
        save_safetensors(_contiguous(held_state_dict(head)), tmp / "head.safetensors",
                         metadata={"format": "pt", "align_fingerprint": model.fingerprint})
        (tmp / "head.json").write_text(json.dumps(
            {"hidden_size": model.arch.hidden_size, "backbone_fingerprint": model.fingerprint,
             **(extra or {})}, indent=2, sort_keys=True))
    return directory


def load_head(model, name: str, directory: str | os.PathLike, trainable: bool = False) -> dict:
    """Add head ``name`` from ``directory``; returns its ``head.json`` record."""
    directory = Path(directory)
    rec = json.loads((directory / "head.json").read_text())
    check_fingerprint(rec.get("backbone_fingerprint"), model, f"head {directory}")
    head = model.add_head(name)
    head.load_state_dict(load_file(directory / "head.safetensors"))
    head.requires_grad_(trainable)
    return rec


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))
