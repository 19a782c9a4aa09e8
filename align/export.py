"""``align export RUN_DIR --out DIR``: a finished run's policy, SFT or reward role as a standalone
checkpoint other tools load (docs/export.md).

Formats (``--format``):

* ``hf`` (default): a Hugging Face checkpoint with the role's adapters merged into the backbone
  weights (LoRA incl. rsLoRA, IA3; ``full`` and ``top_k`` write their copied weights), its
  tokenizer, chat template and a ``generation_config.json`` whose ``eos_token_id`` lists every
  token the policy stops at. A reward role becomes a one-label ``*ForSequenceClassification``.
  Methods whose effect is not a weight change (bottleneck, prefix, prompt, P-tuning,
  LLaMA-Adapter) are refused, naming the format to use instead (align/export_hf.py).
* ``peft``: the adapter set in HF peft's layout (``adapter_config.json``), for methods peft has.
* ``gguf``: one llama.cpp file (``--dtype f32 | f16 | q8_0``), Llama family only
  (align/export_gguf.py).

Every export writes a model card (README.md) and a marker ``.align-export.json``; everything is
checked before the backbone is loaded, and written into a temporary sibling that is renamed into
place, so a refused or failed export leaves nothing behind. An existing ``--out`` is replaced only
with ``--overwrite``, and only when an earlier export wrote it. ``--push-to-hub REPO`` then uploads
the finished, verified folder with huggingface_hub (align/hub.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from align.outputs import check_output_dir
from align.rundir import RunDir

FORMATS = ("hf", "peft", "gguf")
GGUF_DTYPES = ("f32", "f16", "q8_0")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
MARKER = ".align-export.json"


class ExportError(ValueError):
    """A refusal: one line naming the file or option at fault, raised before anything is written."""


# ------------------------------------------------------------------------------------------------
# The run directory: what align export / align generate read from a run (its layout: align/rundir.py).
# ------------------------------------------------------------------------------------------------
@dataclass
class RoleSpec:
    name: str
    adapters: list[tuple[str, Path]]     # (set name, adapter directory) in stack order
    head: Path | None = None             # a reward role's head directory
    normalisation: dict | None = None


@dataclass
class RunInfo:
    path: Path
    stage: str
    backbone: dict                       # backbone.json: path, fingerprint, dtype, quantization
    summary: dict
    config: dict                         # config.yaml (empty when absent)
    roles: dict[str, RoleSpec]
    main_role: str
    lineage: list[dict] = field(default_factory=list)   # [{stage, run, data}] earliest first

    @property
    def chat_template(self) -> str | None:
        return (self.config.get("data") or {}).get("chat_template")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path.parent}: no {path.name} ({what})") from None
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def _read_config(run: Path) -> dict:
    f = RunDir(run).config
    if not f.is_file():
        return {}
    import yaml
    try:
        return yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{f}: unreadable ({e})") from None


def _stack(run: Path, record: dict, where: Path) -> list[tuple[str, Path]]:
    try:
        entries = [(e["name"], Path(e["dir"])) for e in record["adapters"]]
    except (KeyError, TypeError) as e:
        raise ExportError(f"{where}: field 'adapters' must list {{name, dir}} entries ({e!r})") from None
    return [(n, d if d.is_absolute() else run / d) for n, d in entries]


def _run_roles(run: Path, config: dict) -> dict[str, RoleSpec]:
    roles: dict[str, RoleSpec] = {}
    rd, sft_run = RunDir(run), config.get("sft_run")
    if rd.adapter("sft").is_dir():
        roles["sft"] = RoleSpec("sft", [("sft", rd.adapter("sft"))])
    elif sft_run and RunDir(sft_run).adapter("sft").is_dir():
        roles["sft"] = RoleSpec("sft", [("sft", RunDir(sft_run).adapter("sft"))])
    where = rd.roles_file()
    try:
        recorded = rd.roles()
    except ValueError as e:
        raise ExportError(f"{where}: not valid JSON ({e})") from None
    if "reward" in recorded:
        rr = recorded["reward"]
        if "head" not in rr:
            raise ExportError(f"{where}: the reward role has no field 'head'")
        roles["reward"] = RoleSpec("reward", _stack(run, rr, where), rd.resolve(rr["head"]), rr.get("normalisation"))
    if "policy" in recorded:
        roles["policy"] = RoleSpec("policy", _stack(run, recorded["policy"], where))
    elif rd.adapter("policy").is_dir():
        roles["policy"] = RoleSpec("policy", [("policy", rd.adapter("policy"))])
    return roles


def _lineage(run: Path, config: dict, stage: str, seen=None) -> list[dict]:
    """The stages behind ``run`` (its sft_run, reward_run, ...) and the data each trained on."""
    seen = seen if seen is not None else set()
    if run.resolve() in seen:
        return []
    seen.add(run.resolve())
    out = []
    for key in ("sft_run", "reward_run"):
        src = config.get(key)
        if src and Path(src).is_dir():
            summary = RunDir(src).summary() or {}
            out += _lineage(Path(src), _read_config(Path(src)), summary.get("stage", key[:-4]), seen)
    data = {k: v for k, v in (config.get("data") or {}).items()
            if k in ("train", "eval", "prompts", "eval_prompts") and v}
    return out + [{"stage": stage, "run": str(run), "data": data}]


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    """A finished run directory's records and roles, or an ``ExportError`` saying what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    rd = RunDir(run)
    if not rd.summary_file.is_file():
        raise ExportError(f"{run_dir}: the run has not finished (no summary.json); export a finished run, "
                          f"or resume it to the end first")
    summary = _read_json(rd.summary_file, "the run's summary")
    if "stopped_at" in summary:
        raise ExportError(f"{run_dir}: the run stopped early at {summary['stopped_at']} (summary.json); "
                          f"resume it to the end before exporting")
    backbone = _read_json(rd.backbone_record, "which backbone the run trained on")
    if "path" not in backbone:
        raise ExportError(f"{rd.backbone_record}: no field 'path'")
    config = _read_config(run)
    roles = _run_roles(run, config)
    if not roles:
        raise ExportError(f"{run_dir}: no adapters/sft, adapters/policy or reward role (roles.json): nothing to export")
    main = next(r for r in ("policy", "reward", "sft") if r in roles)
    stage = summary.get("stage") or main
    return RunInfo(run, stage, backbone, summary, config, roles, main, _lineage(run, config, stage))


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (rather than, say, a checkpoint align export wrote)."""
    return RunDir(path).backbone_record.is_file()


def adapter_methods(spec: RoleSpec) -> list[str]:
    """The method of each adapter set of a role (from the saved records, without loading weights)."""
    from align.adapters.peft_format import read_adapter_config
    methods = []
    for name, d in spec.adapters:
        if not (d / "adapter_model.safetensors").is_file():
            raise ExportError(f"{d}: no adapter_model.safetensors (adapter set {name!r} of role {spec.name!r})")
        try:
            methods.append(read_adapter_config(d)[0].method)
        except (OSError, ValueError, TypeError) as e:
            raise ExportError(f"{d}: unreadable adapter record ({e})") from None
    return methods


# ------------------------------------------------------------------------------------------------
def load_roles(info: RunInfo, roles: list[str], device: str = "cpu", dtype: str = "float32"):
    """Tokenizer and ``AlignModel`` on the run's backbone (float weights: a quantized run's adapters
    attach to the float checkpoint, whose fingerprint they carry) with ``roles`` added."""
    from align.adapters.peft_format import load_adapter, load_head
    from align.config import ModelConfig
    from align.stages.common import load_model
    from align.hub import model_problem
    mcfg = ModelConfig(path=info.backbone["path"], dtype=dtype)
    if (problem := model_problem(mcfg.path)) is not None:
        raise ExportError(f"{info.path / 'backbone.json'}: the backbone {mcfg.path} does not exist any more"
                          + ("" if problem == "no such file or directory" else f" ({problem})"))
    tok, model = load_model(mcfg.path, mcfg, device, chat_template=info.chat_template)
    if info.backbone.get("fingerprint") and info.backbone["fingerprint"] != model.fingerprint:
        raise ExportError(f"{info.path / 'backbone.json'}: the run trained on backbone {info.backbone['fingerprint']}, "
                          f"but {mcfg.path} is now {model.fingerprint}")
    loaded: dict[Path, str] = {}
    for role in roles:
        spec = info.roles[role]
        stack = []
        for name, d in spec.adapters:
            key = d.resolve()
            if key not in loaded:
                loaded[key] = f"{role}__{name}"
                load_adapter(model, loaded[key], d)
            stack.append(loaded[key])
        head = None
        if spec.head is not None:
            head = f"{role}__head"
            load_head(model, head, spec.head)
        model.add_role(role, stack, head=head)
    model.eval()
    return tok, model


def backbone_dir(info: RunInfo) -> Path:
    """The run's backbone on disk: its path, or a Hub id's snapshot in the local cache."""
    from align.hub import NotCached, local_model_path
    try:
        return local_model_path(info.backbone["path"])
    except NotCached as e:
        raise ExportError(f"{info.path / 'backbone.json'}: {e}") from None


# ------------------------------------------------------------------------------------------------
def check_output(out: str | os.PathLike, overwrite: bool, protected: list[Path]) -> None:
    """Refuse ``--out`` when writing it could lose something: a run, the backbone, files an export
    did not write, or an earlier export without ``--overwrite`` (align/outputs.py)."""
    check_output_dir(out, protected, overwrite, MARKER, "align export", "an earlier export", ExportError)


def check_request(info: RunInfo, role: str, fmt: str, dtype: str | None) -> list[str]:
    """Every refusal that needs no backbone: unknown role or format, a method the format cannot
    carry, a GGUF architecture or tokenizer llama.cpp would not read. Returns the role's methods."""
    from align.export_hf import merge_refusal
    if role not in info.roles:
        raise ExportError(f"--role {role}: {info.path} has the roles {', '.join(info.roles)}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    spec, methods = info.roles[role], adapter_methods(info.roles[role])
    if fmt == "gguf" and (dtype or "f32") not in GGUF_DTYPES:
        raise ExportError(f"--dtype {dtype}: GGUF export writes {', '.join(GGUF_DTYPES)}")
    if fmt == "hf" and (dtype or "f32") not in HF_DTYPES:
        raise ExportError(f"--dtype {dtype}: HF export writes {', '.join(HF_DTYPES)}")
    if fmt == "peft" and dtype:
        raise ExportError(f"--dtype {dtype}: a peft export holds the adapter's tensors as trained; leave --dtype out")
    if spec.head is not None and fmt != "hf":
        raise ExportError(f"--format {fmt}: a reward role exports as a Hugging Face sequence-classification "
                          f"checkpoint only; use --format hf")
    if fmt in ("hf", "gguf"):
        for m in methods:
            if (why := merge_refusal(m)) is not None:
                raise ExportError(f"--format {fmt}: role {role!r} uses {m}, which {why}")
    if fmt == "peft":
        _check_peft(role, spec, methods)
    if fmt == "gguf":
        from align.export_gguf import gguf_refusal
        if (why := gguf_refusal(info.backbone["path"])) is not None:
            raise ExportError(f"--format gguf: {why}")
    return methods


def _check_peft(role: str, spec: RoleSpec, methods: list[str]) -> None:
    from align.adapters.base import METHODS
    if len(spec.adapters) > 1:
        raise ExportError(f"--format peft: role {role!r} stacks {len(spec.adapters)} adapter sets "
                          f"({', '.join(n for n, _ in spec.adapters)}) and a peft model applies one; "
                          f"use --format hf, which merges the stack")
    if METHODS[methods[0]].peft_type is None:
        raise ExportError(f"--format peft: HF peft has no {methods[0]} method; use --format hf"
                          + (" (merged weights)" if methods[0] in ("full", "top_k") else ""))


# ------------------------------------------------------------------------------------------------
def export(run_dir, out, fmt: str = "hf", role: str | None = None, dtype: str | None = None,
           overwrite: bool = False) -> Path:
    """Export ``role`` of the finished run ``run_dir`` to ``out`` (see the module docstring)."""
    from align.adapters.peft_format import atomic_dir
    info = read_run(run_dir)
    role = role or info.main_role
    methods = check_request(info, role, fmt, dtype)
    check_output(out, overwrite, [info.path, backbone_dir(info)] + [d for _, d in info.roles[role].adapters])
    tok, model = (None, None) if fmt == "peft" else load_roles(info, [role])
    out = Path(out)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)
        if fmt == "peft":
            files = write_peft(info, role, tmp)
        elif fmt == "gguf":
            from align.export_gguf import write_gguf
            files = [write_gguf(model, tok, role, info, tmp, dtype or "f32")]
        elif info.roles[role].head is not None:
            from align.export_hf import write_reward
            files = write_reward(model, tok, role, info, tmp, dtype or "f32")
        else:
            from align.export_hf import write_causal_lm
            files = write_causal_lm(model, tok, role, info, tmp, dtype or "f32")
        from align.export_card import model_card
        (tmp / "README.md").write_text(model_card(info, role, fmt, dtype, methods, files))
        (tmp / MARKER).write_text(json.dumps({"run": str(info.path.resolve()), "role": role, "format": fmt,
                                              "dtype": dtype, "files": sorted(files)}, indent=2))
    return out


def write_peft(info: RunInfo, role: str, out: Path) -> list[str]:
    """The role's one adapter set in peft's layout, its base model the run's backbone. An LM-head
    LoRA's rows for tokens align added (its own PAD) are dropped: peft loads it onto the original
    checkpoint, whose vocabulary does not have them."""
    from safetensors.torch import load_file

    from align.adapters.peft_format import PEFT_CONFIG, WEIGHTS, peft_base
    from align.backbone import resolve_checkpoint
    from align.checkpoint import save_safetensors
    from align.export_hf import original_vocab_size
    (_, src), = info.roles[role].adapters
    cfg = json.loads((src / PEFT_CONFIG).read_text())
    cfg.pop("revision", None)
    cfg.update(peft_base(info.backbone["path"]))
    n_vocab = original_vocab_size(resolve_checkpoint(info.backbone["path"]))
    tensors = load_file(str(src / WEIGHTS))
    tensors = {k: (v[:n_vocab] if k.endswith("lm_head.lora_B.weight") and v.shape[0] > n_vocab else v)
               for k, v in tensors.items()}
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out / WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return [WEIGHTS, PEFT_CONFIG]


# ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (sft, reward, ppo, grpo, rloo or dpo)")
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf (merged, default) | peft | gguf")
    p.add_argument("--role", choices=("policy", "sft", "reward"),
                   help="which role of the run (default: policy, else reward, else sft)")
    p.add_argument("--dtype", help="gguf: f32 | f16 | q8_0 (default f32); hf: f32 | f16 | bf16 (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="then upload the export to this Hugging Face Hub model repository (org/name; created when "
                        "missing) with huggingface_hub, its token from HF_TOKEN or `hf auth login`")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


# the files an export of each format cannot be without (besides README.md and what the marker lists)
REQUIRED = {"hf": ("config.json", "tokenizer_config.json"),
            "peft": ("adapter_config.json", "adapter_model.safetensors"), "gguf": ()}


def verify_export(out: Path) -> list[str]:
    """The files of the finished export ``out`` (its marker's list and the model card), every one
    present and not empty, the weights among them; an ``ExportError`` naming what is missing."""
    marker = _read_json(out / MARKER, "an export's record; is --out an export?")
    files = sorted(set(marker.get("files") or []) | {"README.md"} | set(REQUIRED.get(marker.get("format"), ())))
    missing = [f for f in files if not (out / f).is_file() or (out / f).stat().st_size == 0]
    if not any(f.endswith((".safetensors", ".gguf")) for f in files):
        missing.append("weights (*.safetensors / *.gguf)")
    if missing:
        raise ExportError(f"{out}: the export is incomplete (missing or empty: {', '.join(missing)}); nothing "
                          f"was uploaded")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="align export", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private goes with --push-to-hub")
    try:
        if args.push_to_hub:
            from align.hub import check_repo_id
            check_repo_id(args.push_to_hub)
        out = export(args.run_dir, args.out, args.format, args.role, args.dtype, args.overwrite)
    except (OSError, ValueError) as e:
        print(f"align export: error: {e}", file=sys.stderr)
        return 1
    files = sorted(f.name for f in out.iterdir() if f.name != MARKER)
    print(f"align export: wrote {out} ({', '.join(files)})")
    return push(out, args.push_to_hub, args.private) if args.push_to_hub else 0


def push(out: Path, repo_id: str, private: bool) -> int:
    """``--push-to-hub``: the verified export ``out`` uploaded to ``repo_id`` (the marker, which
    names local paths and serves ``--overwrite``, stays here)."""
    from align.hub import push_folder
    try:
        verify_export(out)
        url = push_folder(out, repo_id, private, ignore=(MARKER,))
    except Exception as e:  # noqa: BLE001 - network, auth or Hub refusals: one line, the export kept
        print(f"align export: error: {out} was written, but uploading it to {repo_id} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"align export: uploaded {out} to {repo_id} ({url})")
    return 0
