"""Issue 16 item 3: every stage validates its whole config before it writes anything.

No model is loaded here: the backbone is an empty directory, the run directories hold only the
files a later stage looks for, and ``load_model`` (and the pipeline's backbone pretraining) is a
tripwire. A config that passes validation reaches the tripwire; one that does not must fail with a
ConfigError naming the key, the bad value and what is allowed, and leave no output behind.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from align import evaluate
from align.config import ConfigError, load_config, reference, validate
from align.demo import pipeline
from align.stages import ppo, reward, sft


class Tripwire(Exception):
    """Raised where a config that passed validation would start loading a model."""


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    import align.demo.pretrain
    import align.stages.common

    def trip(*a, **k):
        raise Tripwire("validation passed; a model would be loaded now")
    monkeypatch.setattr(align.stages.common, "load_model", trip)
    monkeypatch.setattr(align.demo.pretrain, "ensure_backbone", trip)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _write(path: Path, text: str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def world(tmp_path):
    """A backbone dir, finished sft / reward / ppo run dirs (only what later stages read) and data."""
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    sft_run = tmp_path / "sft_run"
    _write(sft_run / "backbone.json", json.dumps({"path": str(backbone)}))
    _write(sft_run / "adapters" / "sft" / "align_adapter.json")
    rm_run = tmp_path / "rm_run"
    _write(rm_run / "roles.json", json.dumps({"reward": {"adapters": [{"name": "reward", "dir": "adapters/reward"}],
                                                         "head": "heads/reward"}}))
    _write(rm_run / "adapters" / "reward" / "align_adapter.json")
    _write(rm_run / "heads" / "reward" / "head.json")
    ppo_run = tmp_path / "ppo_run"
    _write(ppo_run / "adapters" / "policy" / "align_adapter.json")
    sft_data = _write(tmp_path / "sft.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    prefs = _write(tmp_path / "prefs.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    prompts = _write(tmp_path / "prompts.jsonl", "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    base = {
        "sft": [f"output_dir={out}", f"model.path={backbone}", f"data.train={sft_data}", "data.eval_fraction=0",
                "tracking.wandb=false"],
        "reward": [f"output_dir={out}", f"sft_run={sft_run}", f"data.train={prefs}", "data.eval_fraction=0",
                   "tracking.wandb=false"],
        "ppo": [f"output_dir={out}", f"sft_run={sft_run}", f"reward_run={rm_run}", f"data.prompts={prompts}",
                "ppo.rollout_batch_size=4", "ppo.micro_batch_size=4", "tracking.wandb=false"],
        "eval": [f"sft_run={sft_run}", f"reward_run={rm_run}", f"policy_b={ppo_run}", f"prompts={prompts}",
                 f"output={out}"],
        "pipeline": [f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "tracking.wandb=false"],
    }
    return {"tmp": tmp_path, "out": out, "base": base, "sft_run": sft_run, "rm_run": rm_run, "prompts": prompts}


STAGES = {"sft": (sft.SFTConfig, sft.run), "reward": (reward.RewardConfig, reward.run),
          "ppo": (ppo.PPOConfig, ppo.run), "eval": (evaluate.EvalConfig, evaluate.run),
          "pipeline": (pipeline.PipelineConfig, pipeline.run)}


def config(world, stage, *overrides):
    return load_config(STAGES[stage][0], None, [*world["base"][stage], *overrides])


def refused(world, stage, *overrides, match: str):
    """Run ``stage`` with ``overrides``: a ConfigError matching ``match``, nothing written."""
    with pytest.raises(ConfigError, match=match) as e:
        STAGES[stage][1](config(world, stage, *overrides))
    assert not world["out"].exists(), f"{stage} wrote {world['out']} before refusing its config"
    return str(e.value)


def test_the_baseline_configs_pass_validation_and_reach_model_loading(world):
    """The fixtures are valid, so every refusal below is the bad value's alone."""
    for stage, (_, run) in STAGES.items():
        cfg = config(world, stage, f"{'output' if stage == 'eval' else 'output_dir'}={world['tmp'] / stage}")
        validate(cfg)
        with pytest.raises(Tripwire):
            run(cfg)


METHODS = ["lora", "bottleneck", "prefix", "ia3", "prompt", "ptuning", "llama_adapter", "full", "top_k"]
DTYPES = "float32, bfloat16, float16"
ADAPTER_CHOICES = [  # (overrides making the field a setting of the method, key, allowed values)
    ([], "adapter.method", ", ".join(METHODS)),
    (["adapter.method=bottleneck"], "adapter.variant", "houlsby, pfeiffer"),
    (["adapter.method=bottleneck"], "adapter.nonlinearity", "relu, gelu, silu, tanh"),
    (["adapter.method=prompt"], "adapter.prompt_init", "random, sample_vocab, text"),
    (["adapter.method=ptuning"], "adapter.prompt_init", "random, sample_vocab, text"),
    (["adapter.method=ptuning"], "adapter.encoder_type", "mlp, lstm, none"),
]
ENUMS = [  # (stage, overrides, key, allowed values)
    *[("sft", pre, key, allowed) for pre, key, allowed in ADAPTER_CHOICES],
    ("sft", [], "model.dtype", DTYPES),
    ("sft", [], "model.attn_implementation", "sdpa, eager, flex_attention"),
    ("sft", [], "train.scheduler", "cosine, linear, constant"),
    ("sft", [], "tracking.mode", "online, offline, disabled"),
    ("reward", [], "init", "sft_copy, sft_stack, base"),
    ("reward", [], "data.ties", "skip, half"),
    ("reward", [], "normalize.source", "sft_samples, best_completions, none"),
    ("reward", [], "model.dtype", DTYPES),
    ("reward", [], "train.scheduler", "cosine, linear, constant"),
    ("reward", [], "tracking.mode", "online, offline, disabled"),
    ("reward", ["init=base"], "adapter.method", ", ".join(METHODS)),
    ("reward", ["init=sft_stack", "adapter.method=bottleneck"], "adapter.variant", "houlsby, pfeiffer"),
    ("ppo", [], "value.init", "reward, fresh"),
    ("ppo", [], "ppo.rollout_logprobs", "auto, sample, recompute"),
    ("ppo", [], "ppo.lr_schedule", "linear, constant"),
    ("ppo", [], "ppo.kl_estimator", "k1, k2, k3"),
    ("ppo", [], "ppo.kl_controller", "fixed, adaptive"),
    ("ppo", [], "ppo.missing_stop_mode", "replace, subtract, none"),
    ("ppo", [], "model.dtype", DTYPES),
    ("ppo", [], "tracking.mode", "online, offline, disabled"),
    ("ppo", ["value.init=fresh"], "value.adapter.method", ", ".join(METHODS)),
    ("ppo", ["value.init=fresh", "value.adapter.method=ptuning"], "value.adapter.encoder_type", "mlp, lstm, none"),
    ("eval", [], "dtype", DTYPES),
    ("pipeline", [], "method", ", ".join(METHODS)),
    ("pipeline", [], "policy.kl_controller", "fixed, adaptive"),
    ("pipeline", [], "tracking.mode", "online, offline, disabled"),
    ("pipeline", [], "policy.stage", "ppo, grpo, rloo, dpo"),
]


@pytest.mark.parametrize("stage,pre,key,allowed", ENUMS, ids=[f"{s}-{k}-{' '.join(p)}" for s, p, k, _ in ENUMS])
def test_a_bad_choice_names_key_value_and_choices_and_writes_nothing(world, stage, pre, key, allowed):
    msg = refused(world, stage, *pre, f"{key}=bogus", match=re.escape(f"{key}='bogus': choose one of "))
    line = next(ln for ln in msg.splitlines() if f"{key}='bogus'" in ln)
    assert sorted(line.split("choose one of ", 1)[1].removesuffix(" (or null)").split(", ")) == \
        sorted(allowed.split(", ")), line


# --- the four cases reported in issue 16 (and lr_schedule=cosin, once silently constant) ------
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_flash_attention_is_refused_with_the_reason_before_anything_is_written(world, stage):
    """align's attention hands the core a 4-D mask, which flash-attention kernels cannot take."""
    msg = refused(world, stage, "model.attn_implementation=flash_attention_2",
                  match=re.escape("model.attn_implementation='flash_attention_2': not supported"))
    assert "4-D mask" in msg and "use sdpa" in msg


def test_reported_adapter_method_lorra_then_the_corrected_rerun_starts(world):
    refused(world, "sft", "adapter.method=lorra", match=r"adapter.method='lorra': choose one of lora, bottleneck")
    with pytest.raises(Tripwire):  # not "output_dir ... already holds a run"
        sft.run(config(world, "sft", "adapter.method=lora"))


def test_reported_reward_init_sft_cpy(world):
    refused(world, "reward", "init=sft_cpy", match=r"init='sft_cpy': choose one of sft_copy, sft_stack, base")
    with pytest.raises(Tripwire):
        reward.run(config(world, "reward", "init=sft_copy"))


def test_reward_adapter_settings_a_copy_of_the_sft_adapters_would_ignore_are_refused(world):
    """init=sft_copy trains a copy of the SFT adapters: adapter.r=32 over an r=8 SFT run used to be
    dropped without a word (a rank-32 lever measured the rank-8 model). Refused, in reward and DPO,
    naming the SFT run's config; the SFT's own value, the defaults and init=sft_stack / base pass."""
    from dataclasses import asdict

    from align.adapters.base import AdapterConfig
    from align.stages import dpo as dpo_stage
    record = world["sft_run"] / "config.yaml"
    record.write_text(yaml.safe_dump({"adapter": {**asdict(AdapterConfig()), "r": 8, "alpha": 16.0}}))
    msg = refused(world, "reward", "adapter.r=32", "adapter.alpha=64",
                  match=r"adapter.r=32: init=sft_copy trains a copy")
    assert "adapter.alpha=64.0" in msg and str(record) in msg and "init=sft_stack" in msg
    for ok in (["adapter.r=8"], [], ["init=sft_stack", "adapter.r=32"], ["init=base", "adapter.r=32"]):
        validate(config(world, "reward", *ok))
    dpo = [f"output_dir={world['out']}", f"sft_run={world['sft_run']}", f"data.train={world['tmp'] / 'prefs.jsonl'}",
           "tracking.wandb=false"]
    with pytest.raises(ConfigError, match=r"adapter.r=32: init=sft_copy trains a copy"):
        validate(load_config(dpo_stage.DPOConfig, None, [*dpo, "adapter.r=32"]))
    validate(load_config(dpo_stage.DPOConfig, None, [*dpo, "init=sft_stack", "adapter.r=32"]))


def test_reported_missing_ppo_prompts_file(world):
    missing = world["tmp"] / "no-such-prompts.jsonl"
    refused(world, "ppo", f"data.prompts={missing}",
            match=re.escape(f"data.prompts={str(missing)!r}: no such file or directory"))
    refused(world, "ppo", "data.prompts=''", match=r"data.prompts='': required")


def test_reported_kl_estimator_k9_is_refused_before_the_first_rollout(world):
    refused(world, "ppo", "ppo.kl_estimator=k9", match=r"ppo.kl_estimator='k9': choose one of k1, k2, k3")


def test_reported_lr_schedule_cosin_is_refused_not_run_constant(world):
    refused(world, "ppo", "ppo.lr_schedule=cosin", match=r"ppo.lr_schedule='cosin': choose one of linear, constant")


def test_the_command_line_reports_the_error_and_exits_2(world, capsys):
    from align.cli import main
    assert main(["sft", *world["base"]["sft"], "adapter.method=lorra"]) == 2
    assert "adapter.method='lorra': choose one of" in capsys.readouterr().err
    assert not world["out"].exists()


# --- ranges ------------------------------------------------------------------------------------
RANGES = [  # (stage, override, expected message)
    ("sft", "train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("sft", "train.lr=0", "train.lr=0.0: must be > 0"),
    ("sft", "train.grad_accum=-2", "train.grad_accum=-2: must be >= 1"),
    ("sft", "train.adam_betas=[0.9,1.0]", "train.adam_betas=[0.9, 1.0]: give two numbers in [0, 1)"),
    ("sft", "data.eval_fraction=1.0", "data.eval_fraction=1.0: must be in [0, 1)"),
    ("sft", "data.max_length=0", "data.max_length=0: must be >= 1"),
    ("reward", "normalize.temperature=0", "normalize.temperature=0.0: must be > 0"),
    ("reward", "center_coef=-1", "center_coef=-1.0: must be >= 0"),
    ("ppo", "ppo.gamma=1.5", "ppo.gamma=1.5: must be in [0, 1]"),
    ("ppo", "ppo.lam=-0.1", "ppo.lam=-0.1: must be in [0, 1]"),
    ("ppo", "ppo.temperature=0", "ppo.temperature=0.0: must be > 0"),
    ("ppo", "ppo.cliprange=0", "ppo.cliprange=0.0: must be > 0"),
    ("ppo", "ppo.cliprange_value=-0.2", "ppo.cliprange_value=-0.2: must be > 0"),
    ("ppo", "ppo.iterations=0", "ppo.iterations=0: must be >= 1"),
    ("ppo", "ppo.response_length=0", "ppo.response_length=0: must be >= 1"),
    ("ppo", "ppo.lr=-1e-4", "ppo.lr=-0.0001: must be > 0"),
    ("ppo", "eval.temperature=0", "eval.temperature=0.0: must be > 0"),
    ("ppo", "data.eval_fraction=-0.1", "data.eval_fraction=-0.1: must be in [0, 1)"),
    ("eval", "num_prompts=0", "num_prompts=0: must be >= 1"),
    ("eval", "temperature=0", "temperature=0.0: must be > 0"),
    ("pipeline", "annotate.k=1", "annotate.k=1: must be >= 2"),
    ("pipeline", "policy.lr=0", "policy.lr=0.0: must be > 0"),
    ("pipeline", "sft.steps=0", "sft.steps=0: must be >= 1"),
    ("pipeline", "reward.steps=-1", "reward.steps=-1: must be >= 0"),
    ("pipeline", "eval.samples=-1", "eval.samples=-1: must be >= 0"),
    ("pipeline", "backbone.heads=3", "backbone.hidden=128: must be a multiple of backbone.heads=3"),
    ("pipeline", "policy.group_size=1", "policy.group_size=1: must be >= 2"),
    ("pipeline", "max_length=4", "max_length=4: must be >= 8"),
    ("pipeline", "task=align.no_such_task", "task='align.no_such_task': cannot be imported"),
    ("pipeline", "task=no_such_task", "task='no_such_task': cannot be imported"),
    ("pipeline", "task=align.tokens", "task='align.tokens': needs the functions prompts, sft_demonstrations, "
                                      "gold_score, gold_scores"),
    ("pipeline", "policy.stage=rloo policy.rollout_batch_size=30 policy.group_size=8",
     "policy.rollout_batch_size=30: not a multiple of policy.group_size=8"),
    ("pipeline", "policy.prompts=10", "policy.prompts=10: fewer than policy.rollout_batch_size=64"),
    ("pipeline", "policy.name=sft", "policy.name='sft': a plain directory name"),
]


@pytest.mark.parametrize("stage,override,expect", RANGES, ids=[f"{s}-{o}" for s, o, _ in RANGES])
def test_an_out_of_range_value_is_refused(world, stage, override, expect):
    refused(world, stage, *override.split(" "), match=re.escape(expect))


def test_every_problem_is_reported_at_once(world):
    msg = refused(world, "ppo", "ppo.kl_estimator=k9", "ppo.lr_schedule=cosin", "ppo.gamma=2",
                  match=r"^3 problems in the config:")
    assert "ppo.kl_estimator='k9'" in msg and "ppo.lr_schedule='cosin'" in msg and "ppo.gamma=2.0" in msg


# --- files and run directories -----------------------------------------------------------------
def test_data_files_must_exist(world):
    gone = world["tmp"] / "gone.jsonl"
    refused(world, "sft", f"data.train={gone}", match=re.escape(f"data.train={str(gone)!r}: no such file"))
    refused(world, "sft", f"data.eval={gone}", match=re.escape(f"data.eval={str(gone)!r}: no such file"))
    refused(world, "reward", f"data.eval={gone}", match=re.escape(f"data.eval={str(gone)!r}: no such file"))
    refused(world, "ppo", f"data.eval_prompts={gone}", match=re.escape(f"data.eval_prompts={str(gone)!r}"))
    refused(world, "eval", f"prompts={gone}", match=re.escape(f"prompts={str(gone)!r}: no such file"))


def test_run_directories_must_hold_what_later_stages_read(world):
    import shutil
    sft_run, rm_run = world["sft_run"], world["rm_run"]
    shutil.rmtree(rm_run / "heads")
    refused(world, "ppo", match=r"reward_run=.* is not a finished reward run: roles.json names heads/reward")
    refused(world, "eval", match=r"reward_run=.* is not a finished reward run")
    shutil.rmtree(sft_run / "adapters")
    refused(world, "reward", match=r"sft_run=.* is not a finished sft run: it has no adapters/sft")
    (sft_run / "backbone.json").unlink()
    refused(world, "ppo", match=r"sft_run=.* is not a finished sft run: it has no backbone.json")
    refused(world, "reward", "sft_run=''", match=r"sft_run: required .*init=sft_copy starts from its adapters")
    refused(world, "ppo", f"sft_run={world['tmp'] / 'nowhere'}", match=r"sft_run=.*nowhere': no such directory")
    refused(world, "eval", f"policy_b={world['tmp']}", match=r"policy_b=.* is not a finished ppo run")


def test_the_reward_source_and_the_backbone_are_checked(world):
    refused(world, "ppo", "reward_fn=tests.ppo_helpers:count_target", match=r"give exactly one")
    refused(world, "ppo", "reward_run=''", "reward_fn=tests.ppo_helpers:count_target",
            match=r"value.init='reward' needs a learned reward")
    refused(world, "ppo", "reward_run=''", "reward_fn=no_such_module_xyz:f", "value.init=fresh",
            match=r"reward_fn='no_such_module_xyz:f': module 'no_such_module_xyz' cannot be imported")
    refused(world, "ppo", "eval.gold=not-a-spec", match=r"eval.gold='not-a-spec': give 'module:function'")
    refused(world, "sft", f"model.path={world['tmp'] / 'nobackbone'}", match=r"model.path=.*: no such file")
    (world["sft_run"] / "backbone.json").write_text(json.dumps({"path": str(world["tmp"] / "moved")}))
    refused(world, "ppo", match=r"model.path: the backbone .*moved' recorded in .*backbone.json does not exist")


def test_an_uneven_minibatch_split_is_reported_with_the_other_problems(world):
    msg = refused(world, "ppo", "ppo.rollout_batch_size=10", "ppo.num_minibatches=3", "ppo.kl_estimator=k9",
                  match=r"ppo.rollout_batch_size=10 does not split")
    assert "ppo.kl_estimator='k9'" in msg


# --- adapter settings belong to their method ----------------------------------------------------
def test_a_field_of_another_method_is_refused_naming_method_and_settings(world):
    refused(world, "sft", "adapter.method=bottleneck", "adapter.r=4",
            match=re.escape("adapter.r=4 is not a setting of bottleneck; its settings are variant, "
                            "bottleneck_size, nonlinearity, init_std"))
    refused(world, "sft", "adapter.method=lora", "adapter.bottleneck_size=32",
            match=re.escape("adapter.bottleneck_size=32 is not a setting of lora; its settings are r, alpha"))
    refused(world, "sft", "adapter.method=full", "adapter.num_virtual_tokens=4",
            match=r"adapter.num_virtual_tokens=4 is not a setting of full; its settings are none")
    refused(world, "ppo", "value.init=fresh", "value.adapter.method=prefix", "value.adapter.r=4",
            match=r"value.adapter.r=4 is not a setting of prefix; its settings are num_virtual_tokens")
    refused(world, "pipeline", "method=bottleneck", "lora_r=4", match=r"lora_r=4 is not a setting of bottleneck")
    refused(world, "sft", "adapter.r=0", match=r"adapter.r=0: must be >= 1")


def test_a_method_own_fields_and_defaults_are_accepted(world):
    """YAML/CLI stay flat: a method's own settings pass; another method's fields at their defaults too."""
    for overrides in (["adapter.method=lora", "adapter.r=4", "adapter.alpha=8", "adapter.target_modules=[q_proj]"],
                      ["adapter.method=bottleneck", "adapter.variant=pfeiffer", "adapter.bottleneck_size=8"],
                      ["adapter.method=ptuning", "adapter.encoder_type=lstm", "adapter.num_virtual_tokens=4"],
                      ["adapter.method=top_k", "adapter.top_k=2", "adapter.extra={tokenizer: x}"]):
        validate(config(world, "sft", *overrides))


def test_the_peft_type_table_is_derived_from_the_method_classes():
    from align.adapters.base import METHODS, peft_types
    assert peft_types() == {"LORA": "lora", "PREFIX_TUNING": "prefix", "IA3": "ia3", "PROMPT_TUNING": "prompt",
                            "P_TUNING": "ptuning", "ADAPTION_PROMPT": "llama_adapter"}
    assert all(METHODS[m].peft_type == t for t, m in peft_types().items())


def test_every_choice_is_listed_in_its_documented_comment():
    """The config reference (docs/configuration.md: each field's help) lists exactly what validation allows."""
    from dataclasses import fields, is_dataclass

    from align.adapters.base import METHODS, AdapterConfig
    from align.rules import OneOf, field_rule

    def choice_rules(obj, at=""):
        for f in fields(obj):
            value, rule = getattr(obj, f.name), field_rule(f)
            if is_dataclass(value):
                yield from choice_rules(value, f"{at}{f.name}.")
            elif isinstance(rule, OneOf):
                yield at + f.name, rule
    from align.registry import STAGES as ALL_STAGES
    seen = 0
    for cls in (stage.config for stage in ALL_STAGES.values()):
        notes = {key: note for key, _, note in reference(cls)}
        for key, rule in choice_rules(cls()):
            seen += 1
            for choice in rule.choices:
                assert choice in notes[key], f"{cls.__name__} {key}: {choice} is not in its comment {notes[key]!r}"
    adapter_notes = {key: note for key, _, note in reference(AdapterConfig)}
    for cls in METHODS.values():
        for name, rule in cls.settings.items():
            if isinstance(rule, OneOf):
                seen += 1
                assert all(c in adapter_notes[name] for c in rule.choices), (cls.method, name)
    assert seen >= 20


def test_every_field_declares_its_help_and_the_reference_shows_all_of_it():
    """Help lives in each field's ``setting(...)``, not in source comments a parser could drop: every
    leaf field of every stage config (adapter settings included) has help, the generated reference
    shows it whole, and no field line carries a trailing comment that would be lost."""
    import ast
    import dataclasses
    import inspect

    from align.adapters.base import AdapterConfig
    from align.config import reference_markdown
    from align.rules import field_help

    import typing

    def leaf_fields(cls, at=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)),
                       None)
            if sub is not None and f.default is not None:
                yield from leaf_fields(sub, f"{at}{f.name}.")
            else:
                yield at + f.name, f, cls
    from align.registry import STAGES as ALL_STAGES
    classes = [stage.config for stage in ALL_STAGES.values()] + [AdapterConfig]
    seen = 0
    for cls in classes:
        table = reference_markdown(cls)
        for key, f, owner in leaf_fields(cls):
            if key.startswith("adapter.") and owner is AdapterConfig and cls is not AdapterConfig:
                continue
            seen += 1
            text = field_help(f)
            assert text, f"{cls.__name__} {key}: no help"
            assert f"| `{key}` |" in table and text.replace("|", "\\|") in table, f"{cls.__name__} {key}"
    assert seen > 150
    for cls in {owner for c in classes for _, _, owner in leaf_fields(c)}:
        src = inspect.getsource(cls)
        for node in ast.parse(src).body[0].body:
            if isinstance(node, ast.AnnAssign):
                for line in src.splitlines()[node.lineno - 1:node.end_lineno]:
                    assert "  # " not in line, f"{cls.__name__}: a comment on a field line: {line.strip()}"


def test_a_mapping_given_on_the_command_line_replaces_the_files_and_a_section_still_merges(tmp_path):
    """`policy.settings={}` must clear the file's mapping (a merge would keep its keys and run
    something else than asked); a dotted key sets one entry; a config section still merges."""
    from align.demo.pipeline import PipelineConfig
    f = tmp_path / "p.yaml"
    f.write_text("policy:\n  stage: grpo\n  settings: {loss_type: dapo, cliprange_high: 0.28}\n"
                 "tracking: {project: p}\n")
    assert load_config(PipelineConfig, str(f), ["policy.settings={}"]).policy.settings == {}
    assert load_config(PipelineConfig, str(f), ["policy.settings={num_epochs: 1}"]).policy.settings == \
        {"num_epochs": 1}
    assert load_config(PipelineConfig, str(f), ["policy.settings.loss_type=bnpo"]).policy.settings == \
        {"loss_type": "bnpo", "cliprange_high": 0.28}
    assert load_config(PipelineConfig, str(f), ["policy.iterations=5"]).policy.stage == "grpo"  # sections merge
    t = load_config(PipelineConfig, str(f), ["tracking={wandb: false}"]).tracking
    assert t.project == "p" and t.wandb is False


# --- the pipeline config, nested by stage -------------------------------------------------------
def test_a_bundled_task_is_named_by_its_bare_name_and_a_module_path_still_works(world):
    from align.demo.tasks import task_module_name
    assert pipeline.PipelineConfig().task == "quickstart"
    assert task_module_name("quickstart") == "align.demo.tasks.quickstart"
    assert task_module_name("short_answers") == "align.demo.tasks.short_answers"
    assert task_module_name("tests.no_such.task") == "tests.no_such.task"
    for task in ("short_answers", "align.demo.tasks.short_answers"):
        cfg = config(world, "pipeline", f"task={task}")
        validate(cfg)
        assert pipeline.gold_spec(cfg) == "align.demo.tasks.short_answers:gold_scores"


def test_the_policy_section_checks_its_own_fields_under_their_dotted_names(world):
    refused(world, "pipeline", "policy.stage=dpo", "policy.rewards=[{role: reward}]",
            match=re.escape("policy.rewards: DPO learns from the rankings"))
    refused(world, "pipeline", "policy.rewards=[{fn: 3}]", match=re.escape("policy.rewards[0].fn=3: give"))
    refused(world, "pipeline", "policy.stage=grpo", "policy.settings={no_such: 1}",
            match=re.escape("policy.settings.no_such: grpo has no setting grpo.no_such"))


def test_every_pipeline_config_under_configs_is_nested_and_valid():
    """configs/quickstart.yaml, smollm2*.yaml: every key a current one (a flat key of the old layout
    would be refused), every value valid."""
    root = Path(__file__).resolve().parents[1] / "configs"
    files = [f for f in sorted(root.glob("*.yaml")) if f.name.startswith(("quickstart", "smollm2"))]
    assert {"quickstart.yaml", "smollm2.yaml", "smollm2_correct.yaml"} <= {f.name for f in files}
    for f in files:
        validate(load_config(pipeline.PipelineConfig, str(f)))
    qs = load_config(pipeline.PipelineConfig, str(root / "quickstart.yaml"))
    assert (qs.sft.steps, qs.annotate.prompts, qs.reward.epochs, qs.policy.iterations, qs.eval.prompts) == \
        (300, 600, 3.0, 80, 256)


def test_a_flat_pipeline_key_is_refused_naming_its_new_key_before_anything_is_written(world, tmp_path, capsys):
    """The keys the pipeline config had before it was nested by stage (ppo_iterations, sft_steps,
    policy_settings, ...) are refused, in a file and on the command line, with the key that replaced
    each: not OmegaConf's bare "key not found", and before the pipeline writes anything."""
    from align.cli import main
    f = _write(tmp_path / "flat.yaml", "ppo_iterations: 5\nsft_steps: 10\ntracking: {wandb: false}\n")
    with pytest.raises(ConfigError, match=re.escape("ppo_iterations is now policy.iterations")) as e:
        load_config(pipeline.PipelineConfig, str(f), [f"output_dir={world['out']}"])
    assert "sft_steps is now sft.steps" in str(e.value) and str(f) in str(e.value)
    with pytest.raises(ConfigError, match=re.escape("ppo_iterations is now policy.iterations")):
        config(world, "pipeline", "ppo_iterations=5")
    with pytest.raises(ConfigError, match=re.escape("policy_settings.loss_type is now policy.settings.loss_type")):
        config(world, "pipeline", "policy_settings.loss_type=dapo")
    assert main(["pipeline", str(f), *world["base"]["pipeline"]]) == 2
    assert "ppo_iterations is now policy.iterations" in capsys.readouterr().err
    assert main(["pipeline", *world["base"]["pipeline"], "ppo_iterations=5", "group_size=8"]) == 2
    err = capsys.readouterr().err
    assert "ppo_iterations is now policy.iterations" in err and "group_size is now policy.group_size" in err
    assert not world["out"].exists()
    table = pipeline.PipelineConfig.RENAMED
    assert len(table) == 32 and all(
        OmegaConf.select(OmegaConf.structured(pipeline.PipelineConfig), new, default="missing") != "missing"
        for new in table.values())
