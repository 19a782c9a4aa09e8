"""The reward an online stage optimises: one source or a weighted mix of several.

A source is the learned reward role (the reward run's adapters and head, ``role: reward``) or a
programmatic function (``fn: module:function``, called as ``align.scoring.call_scorer`` calls it,
with the prompt records' columns). A function may return None for a response it has no opinion on
(a verifier for another kind of question): that source then adds nothing to the response's score.
Each response's score is ``sum_i weight_i * s_i`` over the sources with an opinion, where ``s_i``
is the learned reward normalised with the reward run's statistics (``normalize_reward``) or a
function's value as it is; the raw score (logged as ``objective/raw_scores``) is the same sum of
the unnormalised values. Every source is checked (one number or None per response, finite) before
anything trains on it, and logged on its own (``reward/<name>/mean``, ``std``, ``none_rate``; a 0/1
verifier's mean is its pass rate). Docs: docs/ppo.md (Reward sources).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import functools

from align.guard import NonFiniteError, check_rewards
from align.rules import Spec, keyword_parameters
from align.scoring import call_scorer, load_callable
from align.verifiers import resolve

ROLE = "reward"   # the one learned role a mix can name
ENTRY_KEYS = {"fn", "role", "weight", "name", "args"}
REWARD_FN_SPEC = Spec(args=3, call="fn(prompts, responses, ended, **columns)", columns=True, names=resolve)


@dataclass
class RewardSource:
    name: str                      # in logs: reward/<name>/...
    weight: float
    fn: Callable | None = None     # None: the learned reward role
    label: str = ""                # where it was configured, for messages


def sources_from_config(cfg) -> list[RewardSource]:
    """The stage's reward sources: ``rewards`` when given, else the one ``reward_run`` or
    ``reward_fn`` (weight 1)."""
    listed = bool(cfg.rewards)
    entries = list(cfg.rewards) or ([{"role": ROLE}] if cfg.reward_run else [{"fn": cfg.reward_fn}])
    out, seen = [], set()
    for i, e in enumerate(entries):
        spec = e.get("fn") or ""
        name = entry_name(e, seen)
        label = (f"rewards[{i}] {spec}" if listed else f"reward_fn {spec}") if spec else \
            f"the reward role ({cfg.reward_run})"
        out.append(RewardSource(name, float(e.get("weight", 1.0)), entry_function(e) if spec else None, label))
    return out


def entry_name(entry: dict, taken: set) -> str:
    """An entry's name in logs and reports: its ``name``, else the function's, else
    ``reward_model``; ``_`` appended until it is not in ``taken`` (which it joins)."""
    spec = resolve(entry.get("fn") or "")
    name = entry.get("name") or (spec.rpartition(":")[2] if spec else "reward_model")
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def entry_function(entry: dict):
    """An entry's function with its ``args`` bound by keyword (``functools.partial``)."""
    fn = load_callable(entry["fn"])
    return functools.partial(fn, **entry["args"]) if entry.get("args") else fn


def entry_problems(entries, reward_run: str, reward_fn: str, at: str) -> list[str]:
    """What is wrong with a ``rewards`` list (each ``{fn | role, weight?, name?}``)."""
    out = []
    if entries and reward_fn:
        out.append(f"{at}reward_fn={reward_fn!r}: give it as an entry of {at}rewards instead (not both)")
    for i, e in enumerate(entries):
        key = f"{at}rewards[{i}]"
        if not isinstance(e, dict) or set(e) - ENTRY_KEYS or ("fn" in e) == ("role" in e):
            out.append(f"{key}={e!r}: give {{fn: module:function}} (or a built-in verifier's name) or "
                       f"{{role: reward}}, optionally weight and name (and args for a function)")
            continue
        if "role" in e and e["role"] != ROLE:
            out.append(f"{key}.role={e['role']!r}: the only learned role is 'reward' (reward_run)")
        if "role" in e and not reward_run:
            out.append(f"{key}: role 'reward' needs reward_run (a finished reward run)")
        if "fn" in e and (problem := REWARD_FN_SPEC.problem(e["fn"])) is not None:
            out.append(f"{key}.fn={e['fn']!r}: {problem}")
        elif "args" in e and "fn" in e:
            out.extend(f"{key}.args: {p}" for p in args_problems(e))
        if "role" in e and "args" in e:
            out.append(f"{key}.args: only a function takes args")
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
            out.append(f"{key}.weight={w!r}: give a finite number")
    if entries and reward_run and not any(isinstance(e, dict) and "role" in e for e in entries):
        out.append(f"{at}reward_run={reward_run!r} is given but {at}rewards has no {{role: reward}} entry; "
                   f"add one or leave reward_run out")
    return out


def args_problems(entry: dict) -> list[str]:
    """What is wrong with a function entry's ``args``: a mapping of keyword parameters the function
    has (after its first three), and nothing it cannot take."""
    args = entry["args"]
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        return [f"{args!r}: give a mapping of the function's parameters to values"]
    params = keyword_parameters(load_callable(entry["fn"]), 3)
    if params is None or params[2]:
        return []
    unknown = sorted(set(args) - set(params[0]))
    if unknown:
        return [f"{entry['fn']} has no parameter {unknown[0]!r} (it takes {', '.join(params[0]) or 'none'})"]
    return []


def required_columns(fn: Callable) -> list[str]:
    """The columns a scorer cannot do without: its parameters after the first three that have no
    default (align.scoring.call_scorer passes them by name)."""
    params = keyword_parameters(fn, 3)
    return [] if params is None else params[1]


def column_problems(cfg, files: list[tuple[str, str]]) -> list[str]:
    """Each prompts record (of the ``(config key, file)`` pairs) that lacks a column a reward
    function or the gold scorer requires: named by file, line and field, before anything is
    written."""
    from align.data.common import read_records
    from align.data.records import where_of
    needs = [(s.label, s.fn) for s in sources_from_config(cfg) if s.fn is not None]
    if cfg.eval.gold:
        needs.append((f"eval.gold {cfg.eval.gold}", load_callable(cfg.eval.gold)))
    needs = [(label, cols) for label, fn in needs if (cols := required_columns(fn))]
    if not needs:
        return []
    out = []
    for key, path in files:
        if not path:
            continue
        for i, rec in enumerate(read_records(path, cfg.data.chat), 1):
            for label, cols in needs:
                missing = [c for c in cols if c not in rec]
                if missing:
                    out.append(f"{where_of(rec, f'{path}: record {i}')}: no field {missing[0]!r}, which {label} "
                               f"requires ({key})")
            if len(out) >= 5:
                return out
    return out


class RewardMix:
    def __init__(self, sources: list[RewardSource], norm: dict, normalize: bool):
        self.sources, self.norm, self.normalize = sources, norm, normalize

    @property
    def uses_role(self) -> bool:
        return any(s.fn is None for s in self.sources)

    def parts(self, prompts: list[dict], texts: list[str], ended: list[bool], role_scores, step: int,
              device) -> torch.Tensor:
        """``[responses, sources]`` raw values, NaN where a function had no opinion (None); a
        NonFiniteError naming the source and the step when one gives anything else than one finite
        number (or None) per response."""
        n, cols = len(prompts), []
        for s in self.sources:
            if s.fn is None:
                cols.append(check_rewards(role_scores, n, s.label, step).to(device))
                continue
            out = list(call_scorer(s.fn, prompts, texts, ended))
            opinion = [v is not None for v in out]
            vals = check_rewards([0.0 if v is None else v for v in out], n, s.label, step)
            vals = vals.to(device).masked_fill(~torch.tensor(opinion, device=device), float("nan"))
            cols.append(vals)
        return torch.stack(cols, 1)

    def combine(self, parts: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """The weighted sum over the sources with an opinion (the learned reward normalised when
        ``normalised`` and ``normalize_reward``)."""
        total = torch.zeros(parts.shape[0], device=parts.device)
        for i, s in enumerate(self.sources):
            v = parts[:, i]
            if s.fn is None and normalised and self.normalize:
                v = (v - self.norm["mean"]) / self.norm["std"]
            total = total + s.weight * torch.nan_to_num(v, nan=0.0)
        return total

    def metrics(self, parts: torch.Tensor) -> dict:
        out = {}
        for i, s in enumerate(self.sources):
            v = parts[:, i]
            has = ~torch.isnan(v)
            vals = v[has]
            out[f"reward/{s.name}/mean"] = float(vals.mean()) if len(vals) else 0.0
            out[f"reward/{s.name}/std"] = float(vals.std()) if len(vals) > 1 else 0.0
            out[f"reward/{s.name}/none_rate"] = 1.0 - float(has.float().mean())
        return out


__all__ = ["RewardMix", "RewardSource", "NonFiniteError", "sources_from_config", "entry_problems"]
