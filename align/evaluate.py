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
from align.hub import RecordsPath
from align.rules import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, OneOf, Spec, setting
from align.rundir import RunDir


@dataclass
class EvalConfig:
    sft_run: str = setting("", "the SFT run dir (backbone and reference policy)")
    reward_run: str = setting("", "the reward run dir (learned reward)")
    policy_a: str = setting("sft", "sft, or a PPO or DPO run dir")
    policy_b: str = setting("", "a PPO or DPO run dir (or sft)")
    prompts: str = setting(
        "",
        "held-out prompts (records with a prompt); or a Hub dataset id org/name[:split] in the local HF cache",
        RecordsPath(required=True, what="a records file with prompts"))
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
    verifiers: list = setting(
        help="verifiers reported per policy: entries {fn: module:function or a built-in verifier, args?, name?} as "
             "a stage's rewards list; each gives its pass rate +- SEM on the sampled responses (and greedy, pass@k "
             "below), and the paired difference B - A",
        factory=list)
    by: str = setting("", "a prompts column to break every verifier's pass rate down by (e.g. kind)")
    greedy: bool = setting(False, "also decode greedily and report each verifier's greedy accuracy")
    samples: int = setting(0, "k >= 2: also draw k samples per prompt and report mean@k and pass@k per verifier",
                           NON_NEGATIVE)
    shots: list = setting(
        help="in-context baselines, one per k listed: the bare backbone (no adapters) prompted with k "
             "demonstrations from `demonstrations`; reported with gold, verifiers and stop rate",
        factory=list)
    demonstrations: str = setting("", "records (prompt, completion) the in-context demonstrations come from",
                                  RecordsPath(what="a records file of demonstrations"))

    def checks(self, at: str) -> Iterator[str]:
        yield from run_dir_problems(self.sft_run, f"{at}sft_run", "sft")
        yield from run_dir_problems(self.reward_run, f"{at}reward_run", "reward")
        for key in ("policy_a", "policy_b"):
            spec = getattr(self, key)
            if spec != "sft":
                for p in run_dir_problems(spec, f"{at}{key}", "ppo"):
                    yield p + ("" if spec else " or sft")
        yield from backbone_problems("", self.sft_run, "sft_run")
        from align.rewardmix import entry_problems
        for p in entry_problems([e for e in self.verifiers], "", "", at):
            yield p.replace("rewards[", "verifiers[")
        if any(isinstance(e, dict) and "role" in e for e in self.verifiers):
            yield f"{at}verifiers: functions only (a learned reward is reported anyway)"
        if self.samples == 1:
            yield f"{at}samples=1: give k >= 2 (or 0: no pass@k)"
        if not isinstance(self.shots, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                        for k in self.shots):
            yield f"{at}shots={self.shots!r}: give a list of demonstration counts (integers >= 0)"
        elif self.shots and not self.demonstrations and any(self.shots):
            yield f"{at}shots={self.shots!r}: needs demonstrations (a records file of prompt, completion)"
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
    model.add_role("base", [])   # the bare backbone: the in-context baselines
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
    from align.data.sft import encode_prompts, prompt_of
    records = read_records(cfg.prompts, cfg.chat)[:cfg.num_prompts]
    out = encode_prompts(records, cfg.prompts, tok, cfg.chat_template)
    for p, r in zip(out, records):  # what a reader is shown: the last user turn, or the text
        prompt = prompt_of(r)[0]
        p["shown"] = prompt[-1]["content"] if isinstance(prompt, list) else p["text"]
    return out


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


def verifier_functions(entries: list) -> dict:
    """``{name: function}`` of ``verifiers`` entries (a function's ``args`` bound)."""
    from align.rewardmix import entry_function, entry_name
    taken: set = set()
    return {entry_name(e, taken): entry_function(e) for e in entries}


def verify(fns: dict, prompts: list[dict], responses: list[str], ended: list[bool]) -> dict[str, torch.Tensor]:
    """Each verifier's values on the responses, NaN where it had no opinion (None)."""
    from align.scoring import call_scorer
    out = {}
    for name, fn in fns.items():
        vals = list(call_scorer(fn, prompts, responses, ended))
        if len(vals) != len(responses):
            raise ValueError(f"verifier {name!r} returned {len(vals)} values for {len(responses)} responses")
        out[name] = torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=torch.float)
    return out


def rate(v: torch.Tensor) -> dict:
    """Mean, SEM and count of the values with an opinion (not NaN)."""
    v = v[~torch.isnan(v)]
    return {"mean": float(v.mean()) if len(v) else float("nan"), "sem": _sem(v), "n": len(v)}


def verifier_report(values: dict[str, torch.Tensor], groups: list | None) -> dict:
    """Per verifier: :func:`rate`, and with ``groups`` (one label per prompt) the same per label."""
    out = {}
    for name, v in values.items():
        out[name] = rate(v)
        if groups is not None:
            labels = sorted({str(g) for g in groups})
            out[name]["by"] = {g: rate(v[torch.tensor([str(x) == g for x in groups])]) for g in labels}
    return out


def _groups(cfg: EvalConfig, prompts: list[dict]) -> list | None:
    if not cfg.by:
        return None
    missing = [i for i, p in enumerate(prompts, 1) if cfg.by not in p["columns"]]
    if missing:
        raise ConfigError(f"{cfg.prompts}: record {missing[0]}: no field {cfg.by!r} (by={cfg.by!r})")
    return [p["columns"][cfg.by] for p in prompts]


def _verifier_views(cfg: EvalConfig, model, tok, rt, prompts: list[dict], role: str, fns: dict,
                    groups: list | None, sampled: dict | None) -> dict:
    """The verifier figures of one role: on the sampled responses given (``sampled``: texts and
    ended), greedily decoded (``cfg.greedy``) and over ``cfg.samples`` draws (mean@k, pass@k)."""
    from align.scoring import decode, generate
    out: dict = {}
    ids = [p["ids"] for p in prompts]
    if sampled is not None:
        out["sampled"] = verifier_report(verify(fns, prompts, sampled["responses"], sampled["ended"]), groups)
    if cfg.greedy:
        resp = generate(model, ids, tok, rt.device, role=role, max_new_tokens=cfg.response_length, greedy=True)
        texts, ended = decode(tok, resp), resp.has_stop.tolist()
        out["greedy"] = verifier_report(verify(fns, prompts, texts, ended), groups)
    if cfg.samples >= 2:
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 9001)
        draws = []
        for _ in range(cfg.samples):
            resp = generate(model, ids, tok, rt.device, role=role, max_new_tokens=cfg.response_length,
                            temperature=cfg.temperature, generator=gen)
            draws.append(verify(fns, prompts, decode(tok, resp), resp.has_stop.tolist()))
        out[f"at_{cfg.samples}"] = {}
        for name in fns:
            v = torch.stack([d[name] for d in draws], 1)           # [prompts, k]
            has = ~torch.isnan(v).all(1)
            mean_k = torch.nanmean(v[has], 1)
            pass_k = (torch.nan_to_num(v[has], nan=0.0) >= 1.0).any(1).float()
            out[f"at_{cfg.samples}"][name] = {"mean_at_k": rate(mean_k), "pass_at_k": rate(pass_k)}
    return out


def in_context_prompts(cfg: EvalConfig, tok, k: int, plain: list[dict]) -> list[dict]:
    """The held-out prompts, each preceded by the same ``k`` demonstrations (drawn with
    ``cfg.seed`` from ``cfg.demonstrations``): earlier user/assistant turns in chat, else
    "prompt completion" paragraphs."""
    import random

    from align.data.common import read_records
    from align.data.records import where_of
    from align.data.sft import encode_prompts, prompt_of
    records = read_records(cfg.prompts, cfg.chat)[:cfg.num_prompts]
    demos = []
    if k:
        pool = read_records(cfg.demonstrations, cfg.chat)
        for i, d in enumerate(pool, 1):
            if "prompt" not in d or "completion" not in d:
                raise ConfigError(f"{cfg.demonstrations}: record {i}: a demonstration needs prompt and completion")
        if len(pool) < k:
            raise ConfigError(f"{cfg.demonstrations}: {len(pool)} demonstrations, fewer than shots={k}")
        rng = random.Random(cfg.seed + 31)
        demos = rng.sample(pool, k)
    shown = []
    for i, r in enumerate(records, 1):
        try:
            prompt, key = prompt_of(r)   # text or a conversation, in 'prompt' or 'messages'
        except ValueError as e:
            raise ValueError(f"{where_of(r, f'{cfg.prompts}: record {i}')}: {e}") from None
        r = {k: v for k, v in r.items() if k != key}
        if isinstance(prompt, list):
            turns = [t for d in demos for t in (d["prompt"] + (d["completion"] if isinstance(d["completion"], list)
                                                                  else [{"role": "assistant",
                                                                         "content": d["completion"]}]))]
            shown.append({**r, "prompt": turns + prompt})
        else:
            head = "".join(f"{d['prompt']} {d['completion']}\n\n" for d in demos)
            shown.append({**r, "prompt": head + prompt})
    out = encode_prompts(shown, cfg.prompts, tok, cfg.chat_template)
    # scorers see the held-out prompt itself (``plain``: held_out_prompts), not the demonstrations
    for o, p in zip(out, plain):
        o["plain_text"] = p["text"]
    return out


@torch.no_grad()
def compare(cfg: EvalConfig) -> dict:
    from align.scoring import call_scorer, decode, evaluate_role, generate, load_callable
    model, tok, rt = build(cfg)
    prompts = held_out_prompts(cfg, tok)
    gold_fn = load_callable(cfg.gold)
    fns = verifier_functions(cfg.verifiers)
    groups = _groups(cfg, prompts)
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
        if fns:
            entry["_verify"] = verify(fns, prompts, out["responses"], out["ended"])
            entry["verifiers"] = _verifier_views(cfg, model, tok, rt, prompts, name, fns, groups, out)
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
    if fns:   # paired over prompts where the verifier has an opinion on both responses
        summary["verifier_diff"] = {n: rate(res["b"]["_verify"][n] - res["a"]["_verify"][n]) for n in fns}
    for k in cfg.shots:
        icl = in_context_prompts(cfg, tok, k, prompts)
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 4242)
        resp = generate(model, [p["ids"] for p in icl], tok, rt.device, role="base",
                        max_new_tokens=cfg.response_length, temperature=cfg.temperature, generator=gen)
        rtexts, ended = decode(tok, resp), resp.has_stop.tolist()
        scored = [{**p, "text": p["plain_text"]} for p in icl]
        entry = {"stop_rate": sum(ended) / max(len(ended), 1), "responses": rtexts[:8]}
        if gold_fn is not None:
            g = torch.tensor(call_scorer(gold_fn, scored, rtexts, ended), dtype=torch.float)
            entry.update(gold_mean=float(g.mean()), gold_sem=_sem(g))
            if summarise is not None:
                entry["gold_terms"] = summarise(texts, rtexts, ended)
        if fns:
            entry["verifiers"] = {"sampled": verifier_report(verify(fns, scored, rtexts, ended), groups)}
            if cfg.greedy:
                g_resp = generate(model, [p["ids"] for p in icl], tok, rt.device, role="base",
                                  max_new_tokens=cfg.response_length, greedy=True)
                entry["verifiers"]["greedy"] = verifier_report(
                    verify(fns, scored, decode(tok, g_resp), g_resp.has_stop.tolist()), groups)
        summary.setdefault("in_context", {})[str(k)] = entry
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
