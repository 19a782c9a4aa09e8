"""Stage configs: dataclasses filled from YAML plus dotted command-line overrides.

OmegaConf does the loading, merging and type checking; this module turns its errors into
messages that name the file and the key, and :func:`validate` checks everything else (choices,
ranges, files and run directories, adapter settings) before a stage writes anything: every config
dataclass declares each field with ``align.rules.setting`` (default, help, rule) and may add
``checks(at)`` for what spans fields or touches the disk; each adapter method declares the settings it reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.adapters.base import AdapterConfig, methods_where
from align.arch import ATTN_IMPLEMENTATIONS, attn_implementation_problem
from align.quantization import QUANTIZATIONS, bitsandbytes_problem, quantized_refusal
from align.hub import ModelPath, model_problem, records_problem
from align.rules import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, OneOf, Range, field_help, field_rule,
                         setting)

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class AttnImplementation(OneOf):
    """``model.attn_implementation``: one of ``ATTN_IMPLEMENTATIONS`` that this install can run; a
    flash-attention name is refused with the reason (align.arch.attn_implementation_problem)."""

    def __init__(self):
        super().__init__(*ATTN_IMPLEMENTATIONS)

    def problem(self, value) -> str | None:
        return attn_implementation_problem(value)


@dataclass
class ModelConfig:
    path: str = setting(
        "",
        "a HF model directory, a .gguf file, or a Hub id org/name[@revision] read from the local HF cache (never "
        "the network; a path on disk wins over an id); or a run dir's backbone reference",
        ModelPath())
    dtype: str = setting("float32", "float32 | bfloat16 | float16", OneOf(*DTYPE_CHOICES))
    trust_remote_code: bool = setting(False, "never on unless asked")
    gradient_checkpointing: bool = setting(False, "recompute backbone activations in backward (memory for time)")
    attn_implementation: str = setting(
        "sdpa",
        "sdpa | eager | flex_attention: transformers' attention function that align's attention delegates to "
        "(prefix key/values and LLaMA-Adapter are added around it); flash_attention_2/3 are refused (they take no "
        "4-D mask)",
        AttnImplementation())
    quantization: str = setting(
        "none",
        "none | int8 | nf4: frozen backbone Linear weights via bitsandbytes (nf4: 4-bit NormalFloat, double "
        "quantization, dtype = compute dtype; QLoRA); refused with the full / top_k methods",
        OneOf(*QUANTIZATIONS))
    zero3_gather_for_generation: bool = setting(
        True,
        "ZeRO-3 / FSDP2 sampling: gather the whole model (fast); false: layer by layer (1/N memory, slow). true holds "
        "a whole backbone per process while sampling; false all-gathers each module (FSDP2: each layer's shards) at "
        "every token (docs/distributed.md)")

    def checks(self, at: str) -> Iterator[str]:
        if (problem := bitsandbytes_problem(self.quantization)) is not None:
            yield f"{at}quantization={self.quantization!r}: {problem}"


@dataclass
class TrainConfig:
    seed: int = setting(0, "data order and initialisation; sampling adds rank * 100003 per process")
    lr: float = setting(1e-3, "peak learning rate (AdamW)", POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay (adapter tensors only)", NON_NEGATIVE)
    adam_eps: float = setting(1e-8, "AdamW epsilon", POSITIVE)
    adam_betas: list = setting(help="AdamW betas", factory=lambda: [0.9, 0.999])
    scheduler: str = setting("cosine", "cosine | linear | constant", OneOf("cosine", "linear", "constant"))
    warmup_steps: int = setting(0, "linear warm-up from 0", NON_NEGATIVE)
    epochs: float = setting(1.0, "passes over the training set (fractions allowed)", POSITIVE)
    max_steps: int = setting(0, ">0 overrides epochs", NON_NEGATIVE)
    batch_size: int = setting(8, "per process, per micro-batch", AT_LEAST_ONE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", AT_LEAST_ONE)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: off)", NON_NEGATIVE)
    log_every: int = setting(10, "steps between logged training metrics", AT_LEAST_ONE)
    eval_every: int = setting(0, "0: at the end only", NON_NEGATIVE)
    save_every: int = setting(0, "0: at the end only", NON_NEGATIVE)
    keep_checkpoints: int = setting(2, "most recent checkpoints kept in checkpoints/", AT_LEAST_ONE)
    stop_after_steps: int = setting(0, "testing aid: stop (as if killed) after this many steps", NON_NEGATIVE)

    def checks(self, at: str) -> Iterator[str]:
        b = self.adam_betas
        if not (isinstance(b, (list, tuple)) and len(b) == 2
                and all(Range(0, 1, hi_open=True).problem(x) is None for x in b)):
            yield f"{at}adam_betas={b!r}: give two numbers in [0, 1)"


@dataclass
class TrackingConfig:
    wandb: bool = setting(True, "false: metrics.jsonl only")
    project: str = setting("align", "W&B project")
    group: Optional[str] = setting(None, "stages of one pipeline share a group")
    name: Optional[str] = setting(None, "W&B run name (default: the stage)")
    mode: Optional[str] = setting(
        None,
        "online | offline | disabled; default offline without an API key",
        OneOf("online", "offline", "disabled", null=True))
    tags: list = setting(help="W&B tags", factory=list)


def load_config(cls, path: str | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build ``cls`` from ``path`` (YAML) and ``overrides`` (``a.b=value``), strictly."""
    where = str(path) if path else "defaults"
    try:
        merged = OmegaConf.structured(cls)
        if path:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: not UTF-8 text") from None
            if isinstance(loaded, DictConfig):
                renamed_keys(cls, list(loaded.keys()), str(path))
            merged = OmegaConf.merge(merged, loaded)
        where = "command-line overrides"
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value")
        renamed_keys(cls, [o.split("=", 1)[0].strip() for o in overrides], where)
        for o in overrides:
            key = o.split("=", 1)[0].strip()
            value = OmegaConf.select(OmegaConf.from_dotlist([o]), key)
            current = OmegaConf.select(merged, key, throw_on_missing=False)
            if isinstance(value, DictConfig) and isinstance(current, DictConfig) \
                    and OmegaConf.get_type(current) is dict:
                # a mapping setting given on the command line replaces the file's (as a list does):
                # `policy.settings={}` clears it; a dotted key (a.b=1) still sets one entry
                OmegaConf.update(merged, key, value, merge=False)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o]))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid config key {key!r}: {msg}") from None
    return obj


def renamed_keys(cls, keys: list, where: str) -> None:
    """Refuse keys a config class has renamed (its ``RENAMED``: old top-level key -> new dotted
    key), naming the key that replaced each, instead of OmegaConf's bare "key not found"."""
    renamed = getattr(cls, "RENAMED", {})
    found = []
    for key in map(str, keys):
        head, _, rest = key.partition(".")
        if head in renamed:
            found.append(f"{key} is now {renamed[head]}{'.' + rest if rest else ''}")
    if found:
        from align.registry import STAGES
        command = next((n for n, s in STAGES.items() if (s.module, s.config_name) == (cls.__module__, cls.__name__)),
                       None)
        hint = f" (`align config {command}` prints every current key)" if command else ""
        raise ConfigError(f"{where}: renamed key{'s' if len(found) > 1 else ''}: {'; '.join(found)}{hint}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_problems(cfg, at: str = "") -> list[str]:
    """Every problem of ``cfg`` (a config dataclass), each ``key=value: what is wrong``: the rule of
    every (nested) field (``align.rules.setting``), then each dataclass's ``checks(at)``."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rule = field_rule(f)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += config_problems(value, f"{at}{f.name}.")
        elif rule is not None and (problem := rule.problem(value)) is not None:
            out.append(f"{at}{f.name}={value!r}: {problem}")
    checks = getattr(cfg, "checks", None)
    if callable(checks):
        out += list(checks(at))
    if not at:
        out += quantization_problems(cfg)
    return out


def quantization_problems(cfg) -> list[str]:
    """A stage on a quantized backbone (``model.quantization`` int8 / nf4) refuses the ``full`` and
    ``top_k`` methods, which train backbone weights: in any adapter section of its config, and in
    the adapter sets of the earlier runs (``*_run`` keys) it loads."""
    import json
    model = getattr(cfg, "model", None)
    q = getattr(model, "quantization", "none")
    if not isinstance(model, ModelConfig) or q == "none" or q not in QUANTIZATIONS:
        return []
    out: list[str] = []
    trains_backbone = methods_where("trains_backbone")

    def walk(obj, at: str):
        items = ([(f"{at}{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
                 if dataclasses.is_dataclass(obj) else [(f"{at}[{i}]", v) for i, v in enumerate(obj)])
        for key, v in items:
            if isinstance(v, AdapterConfig):
                if v.method in trains_backbone:
                    out.append(f"{key}.method={v.method!r}: {quantized_refusal(v.method, q)}")
            elif (dataclasses.is_dataclass(v) and not isinstance(v, type)) or isinstance(v, (list, tuple)):
                walk(v, f"{key}." if dataclasses.is_dataclass(v) else key)
    walk(cfg, "")
    for f in dataclasses.fields(cfg):
        run = getattr(cfg, f.name)
        if not (f.name.endswith("_run") and isinstance(run, str) and run and Path(run).is_dir()):
            continue
        for rec in sorted(Path(run).glob("adapters/*/align_adapter.json")):
            try:
                method = json.loads(rec.read_text())["method"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record is reported where it is loaded
            if method in trains_backbone:
                out.append(f"{f.name}={run!r}: its adapter set {rec.parent.name} is {method!r}; "
                           f"{quantized_refusal(method, q)}")
    return out


def validate(cfg) -> None:
    """Refuse ``cfg`` with one ConfigError listing every problem (key, bad value, what is allowed).
    Every stage calls this first, before its run directory is written or a backbone is loaded."""
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))


def run_dir_problems(path: str, key: str, kind: str = "sft") -> list[str]:
    """What a finished run directory of stage ``kind`` (sft | reward | ppo) lacks that a later stage
    reads: sft: backbone.json and adapters/sft; reward: the reward role in roles.json, its adapter
    dirs and head; ppo: adapters/policy."""
    from align.rundir import RunDir
    if not path:
        return [f"{key}: required (a finished {kind} run directory)"]
    run = RunDir(path)
    if not run.path.is_dir():
        return [f"{key}={path!r}: no such directory"]
    if kind == "reward":
        return _reward_role_problems(run, path, key)
    need = {"sft": [run.backbone_record, run.adapter("sft")], "ppo": [run.adapter("policy")]}[kind]
    return [f"{key}={path!r} is not a finished {kind} run: it has no {n.relative_to(run.path)}"
            for n in need if not n.exists()]


def _reward_role_problems(run, path: str, key: str) -> list[str]:
    """A reward run's role record must name adapter dirs and a head that exist."""
    f = run.roles_file()
    try:
        rr = run.role("reward")
        if rr is None:
            return [f"{key}={path!r} is not a finished reward run: it has no reward role ({f.name})"]
        parts = [e["dir"] for e in rr["adapters"]] + [rr["head"]]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{key}={path!r}: {f.name} is unreadable ({e!r})"]
    return [f"{key}={path!r} is not a finished reward run: {f.name} names {p}, which does not exist"
            for p in parts if not run.resolve(p).is_dir()]


def ignored_adapter_settings(init: str, adapter: AdapterConfig, sft_run: str, at: str) -> Iterator[str]:
    """With ``init=sft_copy`` a stage trains a copy of the SFT run's adapters, so an ``adapter.*`` set
    away from its default to a value the SFT run was not given would be silently ignored: each is
    refused instead, naming the SFT run's config."""
    if init != "sft_copy" or not sft_run:
        return
    from align.rundir import RunDir
    record = RunDir(sft_run).config
    try:
        sft = yaml.safe_load(record.read_text())["adapter"]
        sft = sft if isinstance(sft, dict) else {}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return  # no readable config.yaml (a run made elsewhere): nothing to compare with
    default = dataclasses.asdict(AdapterConfig())
    for key, value in dataclasses.asdict(adapter).items():
        if value != default.get(key) and key in sft and value != sft[key]:
            yield (f"{at}adapter.{key}={value!r}: init=sft_copy trains a copy of the SFT run's adapters "
                   f"({key}={sft[key]!r} in {record}), so this setting would be ignored; use init=sft_stack (new "
                   f"adapters with these settings over the frozen SFT ones)")


def backbone_problems(model_path: str, sft_run: str, key: str = "model.path") -> list[str]:
    """The backbone a stage will load: ``model.path`` when given, else the one the SFT run's
    backbone.json records; it must exist (a Hub id: be in the local cache)."""
    import json
    if model_path:
        return []  # checked by ModelConfig's rule
    from align.rundir import RunDir
    rec = RunDir(sft_run).backbone_record if sft_run else None
    if rec is None or not rec.is_file():
        return []  # the sft_run problem is reported on its own
    try:
        path = json.loads(rec.read_text())["path"]
    except (ValueError, KeyError, TypeError):
        return [f"{rec}: unreadable backbone record; give {key}"]
    problem = model_problem(path)
    if problem is None:
        return []
    if problem == "no such file or directory":
        return [f"{key}: the backbone {path!r} recorded in {rec} does not exist; give {key}"]
    return [f"{key}: the backbone {path!r} recorded in {rec}: {problem}; give {key}"]


def require_file(path: str, key: str) -> Path | str:
    """A records source a stage reads: the file or directory ``path``, or ``path`` itself when it is
    a Hub dataset id in the local cache (align/hub.py); else a ConfigError naming ``key``."""
    p = Path(path)
    if path and p.exists():
        return p
    problem = records_problem(path) if path else None
    if not path or problem == "no such file or directory":
        raise ConfigError(f"{key}: path {path!r} does not exist")
    if problem is not None:
        raise ConfigError(f"{key}={path!r}: {problem}")
    return path


__all__ = ["AdapterConfig", "ModelConfig", "TrainConfig", "TrackingConfig", "ConfigError",
           "load_config", "save_config", "to_dict", "require_file", "validate", "config_problems",
           "run_dir_problems", "backbone_problems"]


def reference(cls) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf of a config dataclass, the help taken from the
    field's ``setting(...)``: one source of truth for the config reference."""
    import typing

    rows: list[tuple[str, str, str]] = []

    def walk(c, prefix: str):
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
            rows.append((prefix + f.name, shown, field_help(f)))

    walk(cls, "")
    return rows


def reference_markdown(cls) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, note in reference(cls):
        note, default = note.replace("|", "\\|"), default.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {note} |")
    return "\n".join(lines) + "\n"
