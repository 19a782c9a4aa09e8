"""``align eval``: compare two policies on held-out prompts.

A policy is ``sft`` (the SFT run's adapters) or a PPO or DPO run dir (its ``adapters/policy``, stacked
as its roles.json says). Both are
loaded as roles over one backbone next to the reference (SFT) and reward roles. For each policy:
mean gold score (when the task has a gold scorer) with its standard error, mean learned reward,
KL to the SFT policy; and win rates of B over A by gold and by the reward model.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from align.config import DTYPE_CHOICES, ConfigError, backbone_problems, run_dir_problems, validate
from align.rules import AT_LEAST_ONE, POSITIVE, Exists, OneOf, Spec, setting
from align.rundir import RunDir


@dataclass
class EvalConfig:
    sft_run: str = setting("", "the SFT run dir (backbone and reference policy)")
    reward_run: str = setting("", "the reward run dir (learned reward)")
    policy_a: str = setting("sft", "sft, or a PPO or DPO run dir")
    policy_b: str = setting("", "a PPO or DPO run dir (or sft)")
    prompts: str = setting(
        "",
        "held-out prompts (records with a prompt)",
        Exists(required=True, what="a records file with prompts"))
    num_prompts: int = setting(256, "how many of them", AT_LEAST_ONE)
    temperature: float = setting(1.0, "sampling temperature", POSITIVE)
    response_length: int = setting(48, "max new tokens", AT_LEAST_ONE)
    gold: str = setting(
        "",
        '"module:function(prompts, responses, ended, **columns) -> list[float]": the prompt records\' other fields '
        "arrive as keyword arguments it names",
        Spec(args=3, call="fn(prompts, responses, ended, **columns)", columns=True))
    chat_template: Optional[str] = setting(None, "Jinja template for conversational prompts (tokenizers without one)")
    chat: bool = setting(False, "plain-text prompts as a user turn (chat template)")
    dtype: Optional[str] = setting(
        None,
        "float32 | bfloat16 | float16; default: the SFT run's model.dtype",
        OneOf(*DTYPE_CHOICES, null=True))
    device: Optional[str] = setting(None, "default: cuda when available, else cpu")
    trust_remote_code: bool = setting(False, "never on unless asked")
    seed: int = setting(0, "sampling seed (the same for both policies)")
    output: str = setting("", "optional: write the comparison JSON here")

    def checks(self, at: str) -> Iterator[str]:
        yield from run_dir_problems(self.sft_run, f"{at}sft_run", "sft")
        yield from run_dir_problems(self.reward_run, f"{at}reward_run", "reward")
        for key in ("policy_a", "policy_b"):
            spec = getattr(self, key)
            if spec != "sft":
                for p in run_dir_problems(spec, f"{at}{key}", "ppo"):
                    yield p + ("" if spec else " or sft")
        yield from backbone_problems("", self.sft_run, "sft_run")
        if self.output and not Path(self.output).resolve().parent.is_dir():
            yield f"{at}output={self.output!r}: its directory does not exist"


def _policy_dir(spec: str, sft_run: str) -> Path:
    if spec == "sft":
        return RunDir(sft_run).adapter("sft")
    return RunDir(spec).adapter("policy")


def _load_policy(model, spec: str, sft_run: str, name: str) -> list[str]:
    """Load a run dir's policy into ``model``; returns its adapter stack: ``adapters/policy``, or
    the stack its roles record (roles.json) gives the policy (a DPO run with ``init=sft_stack``: the SFT adapters,
    reusing the loaded ``sft`` set, under the run's own set)."""
    from align.adapters.peft_format import load_adapter
    run = RunDir(spec)
    entries = (run.role("policy") or {"adapters": [{"name": "policy", "dir": "adapters/policy"}]})["adapters"]
    sft_dir = RunDir(sft_run).adapter("sft").resolve()
    stack = []
    for e in entries:
        d = run.resolve(e["dir"])
        if e["name"] == "sft" and d.resolve() == sft_dir and "sft" in model.adapters:
            stack.append("sft")
            continue
        set_name = f"policy_{name}" if e["name"] == "policy" else f"policy_{name}_{e['name']}"
        load_adapter(model, set_name, d)
        stack.append(set_name)
    return stack


def build(cfg: EvalConfig):
    from align.adapters.peft_format import load_adapter
    from align.config import ModelConfig
    from align.scoring import load_reward_role
    from align.distributed import Runtime
    from align.stages.common import backbone_from_run, load_model
    validate(cfg)  # every key, file and run dir, before a backbone is loaded
    if not (cfg.sft_run and cfg.reward_run and cfg.policy_b and cfg.prompts):
        raise ConfigError("sft_run, reward_run, policy_b and prompts are required")
    record = backbone_from_run(cfg.sft_run)
    rt = Runtime(device=cfg.device)
    mcfg = ModelConfig(path=record["path"], dtype=cfg.dtype or record.get("dtype", "float32"),
                       trust_remote_code=cfg.trust_remote_code,
                       quantization=record.get("quantization", "none"))  # the backbone the SFT ran on
    tok, model = load_model(record["path"], mcfg, rt.device, chat_template=cfg.chat_template)
    load_adapter(model, "sft", RunDir(cfg.sft_run).adapter("sft"))
    model.add_role("reference", ["sft"])
    for name, spec in (("a", cfg.policy_a), ("b", cfg.policy_b)):
        if spec == "sft":
            model.add_role(name, ["sft"])
        else:
            model.add_role(name, _load_policy(model, spec, cfg.sft_run, name))
    load_reward_role(model, cfg.reward_run, sft_dir=RunDir(cfg.sft_run).adapter("sft"), prefix="rm")
    model.eval()
    return model, tok, rt


def held_out_prompts(cfg: EvalConfig, tok) -> list[dict]:
    """The first ``num_prompts`` records' prompts as text (conversations through the chat template)
    and token ids."""
    from align.data.common import read_records
    from align.data.sft import encode_prompts
    records = read_records(cfg.prompts, cfg.chat)[:cfg.num_prompts]
    out = encode_prompts(records, cfg.prompts, tok, cfg.chat_template)
    for p, r in zip(out, records):  # what a reader is shown: the last user turn, or the text
        p["shown"] = r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else p["text"]
    return out


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


@torch.no_grad()
def compare(cfg: EvalConfig) -> dict:
    from align.scoring import call_scorer, evaluate_role, load_callable
    model, tok, rt = build(cfg)
    prompts = held_out_prompts(cfg, tok)
    gold_fn = load_callable(cfg.gold)
    # the gold module's optional gold_summary(prompts, responses, ended) -> dict: rates of the
    # gold's ingredients (share correct, mean words, ...) for the report
    summarise = getattr(sys.modules.get(getattr(gold_fn, "__module__", "")), "gold_summary", None)
    texts = [p["text"] for p in prompts]
    res = {}
    for name in ("a", "b"):
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 4242)
        out = evaluate_role(model, model, prompts, tok, rt.device, role=name, temperature=cfg.temperature,
                            max_new_tokens=cfg.response_length, generator=gen)
        entry = {"reward_mean": float(out["reward"].mean()), "reward_sem": _sem(out["reward"]),
                 "kl_to_sft_mean": float(out["kl"].mean()), "responses": out["responses"],
                 "_reward": out["reward"]}
        if gold_fn is not None:
            g = torch.tensor(call_scorer(gold_fn, prompts, out["responses"], out["ended"]), dtype=torch.float)
            entry.update(gold_mean=float(g.mean()), gold_sem=_sem(g), _gold=g)
            if summarise is not None:
                entry["gold_terms"] = summarise(texts, out["responses"], out["ended"])
        entry["stop_rate"] = sum(out["ended"]) / len(out["ended"])
        res[name] = entry
    summary = {"n_prompts": len(prompts), "policy_a": cfg.policy_a, "policy_b": cfg.policy_b}
    for name in ("a", "b"):
        summary[name] = {k: v for k, v in res[name].items() if not k.startswith("_") and k != "responses"}
    summary["win_rate_b_by_reward"] = float(((res["b"]["_reward"] > res["a"]["_reward"]).float()
                                             + 0.5 * (res["b"]["_reward"] == res["a"]["_reward"]).float()).mean())
    if gold_fn is not None:
        gb, ga = res["b"]["_gold"], res["a"]["_gold"]
        summary["win_rate_b_by_gold"] = float(((gb > ga).float() + 0.5 * (gb == ga).float()).mean())
        diff = gb - ga
        summary["gold_diff_mean"], summary["gold_diff_sem"] = float(diff.mean()), _sem(diff)
    summary["samples"] = [{"prompt": p["shown"], "a": ra, "b": rb} for p, ra, rb in
                          zip(prompts[:8], res["a"]["responses"][:8], res["b"]["responses"][:8])]
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def rm_accuracy_vs_gold(cfg: EvalConfig, k: int = 4) -> dict:
    """Reward-model accuracy against gold labels on held-out prompts: K SFT samples per prompt,
    every pair with different gold scores, correct when the RM orders it as gold does."""
    from align.scoring import call_scorer, decode, generate, load_callable, score
    model, tok, rt = build(cfg)
    gold_fn = load_callable(cfg.gold)
    prompts = held_out_prompts(cfg, tok)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 777)
    rewards, golds = [], []
    for _ in range(k):
        resp = generate(model, [p["ids"] for p in prompts], tok, rt.device, role="reference",
                        max_new_tokens=cfg.response_length, temperature=cfg.temperature, generator=gen)
        rewards.append(score(model, resp, ("reward",), cfg.temperature, len(prompts))["reward"]["score"].cpu())
        decoded, has_stop = decode(tok, resp), resp.has_stop
        golds.append(torch.tensor(call_scorer(gold_fn, prompts, decoded, has_stop.tolist()), dtype=torch.float))
    r, g = torch.stack(rewards, 1), torch.stack(golds, 1)
    correct = total = 0
    for i in range(k):
        for j in range(i + 1, k):
            differ = g[:, i] != g[:, j]
            agree = ((r[:, i] > r[:, j]) == (g[:, i] > g[:, j])) & differ
            correct += int(agree.sum())
            total += int(differ.sum())
    return {"rm_accuracy_vs_gold": correct / max(total, 1), "rm_eval_pairs": total}


def run(cfg: EvalConfig) -> dict:
    summary = compare(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    return summary
