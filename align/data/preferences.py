"""Preference data for the reward model: pairs and K-wise rankings as *prompt groups*.

Every record becomes one group ``(prompt, K completions, ranks)`` (lower rank = better, equal
ranks = tie). A pair is a group with K = 2. A group is one batch element, as in InstructGPT: its
K completions go through one forward pass and its C(K,2) ordered pairs are averaged into one
loss term, so a prompt with many completions is not weighted K(K-1)/2 times.

Accepted records: canonical rankings ``{prompt, completions, ranks}``; pairs ``{prompt, chosen,
rejected}`` (TRL explicit prompt, standard or conversational); implicit-prompt pairs ``{chosen,
rejected}`` whose shared beginning is taken as the prompt. A prompt may be a conversation (in
``prompt`` or ``messages``) ending with a user or tool turn; the completions are the next assistant
turn. A conversation prompt too long for ``data.max_length`` loses its oldest turns whole (system
turns and the last user turn stay) before tokens are cut from the left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from align.data.chat import check_messages, drop_oldest_turns
from align.data.sft import render


@dataclass
class Group:
    prompt: object                  # str or list of messages
    completions: list               # K completions (str or message lists)
    ranks: list[int]
    margin: float = 0.0             # pairs only: required reward gap (TRL's margin)
    weight: float = 1.0
    tools: list | None = None       # function schemas the chat template renders (the record's ``tools``)


def _common_prefix(a, b):
    if isinstance(a, list):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n], a[n:], b[n:]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = a.rfind(" ", 0, n + 1) if n < min(len(a), len(b)) else n
    cut = max(cut, 0)
    return a[:cut], a[cut:], b[cut:]


def _weight(rec: dict, where: str) -> float:
    """The record's ``weight``: absent or null means 1; 0 stays 0 (the record counts for nothing);
    a negative, non-finite or non-numeric weight is refused, naming the record and the field."""
    raw = rec.get("weight")
    if raw is None:
        return 1.0
    try:
        w = float(raw)
    except (TypeError, ValueError):
        w = math.nan
    if isinstance(raw, bool) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: field 'weight' must be a finite number >= 0, got {raw!r}")
    return w


def _finite(rec: dict, key: str, where: str, default: float) -> float:
    raw = rec.get(key)
    if raw is None:
        return default
    try:
        x = float(raw)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(raw, bool) or not math.isfinite(x):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {raw!r}")
    return x


def _ranks(rec: dict, n: int, where: str) -> list[int]:
    ranks = rec["ranks"]
    ok = isinstance(ranks, list) and len(ranks) == n and all(
        not isinstance(r, bool) and isinstance(r, (int, float)) and math.isfinite(r) and r == int(r) and r >= 0
        for r in ranks)
    if not ok:
        raise ValueError(f"{where}: field 'ranks' needs one integer >= 0 per completion ({n}), got {ranks!r}")
    return [int(r) for r in ranks]


def _prompt(rec: dict):
    """The record's prompt: ``prompt`` (text or a conversation), or ``messages``, a conversation;
    a conversation ends with a user (or tool) turn, the completions being the next assistant turn."""
    if "prompt" in rec:
        prompt, key = rec["prompt"], "prompt"
    else:
        prompt, key = rec["messages"], "messages"
    if not isinstance(prompt, str):
        check_messages(prompt, key, prompt=True)
    return prompt


def to_group(rec: dict, where: str) -> Group:
    """The record as a prompt group; a field that cannot be trained on (a non-finite ``margin``,
    ``weight`` or ``scores``, a non-integer rank, a completion repeated inside one ranking) is
    refused, naming ``where`` (file and line) and the field."""
    w = _weight(rec, where)
    try:
        if "completions" in rec:
            comps = rec["completions"]
            if not isinstance(comps, list) or len(comps) < 2:
                raise ValueError("field 'completions' needs K >= 2 entries")
            ranks = _ranks(rec, len(comps), where)
            seen: dict = {}
            for i, c in enumerate(comps):
                j = seen.setdefault(repr(c), i)
                if j != i:
                    raise ValueError(f"field 'completions': completions[{i}] repeats completions[{j}] (one text "
                                     f"cannot be ranked against itself)")
            scores = rec.get("scores")
            if scores is not None and (not isinstance(scores, list) or len(scores) != len(comps) or not all(
                    not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in scores)):
                raise ValueError(f"field 'scores' needs one finite number per completion, got {scores!r}")
            return Group(_prompt(rec), comps, ranks, 0.0, w, rec.get("tools"))
        chosen, rejected = rec["chosen"], rec["rejected"]
        if "prompt" in rec or "messages" in rec:
            prompt = _prompt(rec)
        else:
            prompt, chosen, rejected = _common_prefix(chosen, rejected)
        return Group(prompt, [chosen, rejected], [0, 1], _finite(rec, "margin", where, 0.0), w, rec.get("tools"))
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


@dataclass
class TokenGroup:
    sequences: list[list[int]]      # prompt + completion (ending at its stop token), per completion
    ranks: list[int]
    margin: float
    weight: float
    prompt_lengths: list[int] = field(default_factory=list)  # prompt tokens at the front of each sequence


def _pair_texts(g: Group, prompt, tokenizer, chat_template) -> list[tuple[str, str]]:
    """(prompt text, completion text) of each of the group's completions after ``prompt``."""
    out = []
    for c in g.completions:
        if isinstance(prompt, list) or isinstance(c, list):
            out.append(render({"prompt": prompt, "tools": g.tools, "completion": c if isinstance(c, list) else
                               [{"role": "assistant", "content": c}]}, tokenizer, chat_template))
        else:
            out.append((prompt, c))
    return out


def _fitting_prompt(g: Group, tokenizer, max_length: int, chat_template, rep):
    """The group's prompt; a conversation that would push a completion past ``max_length`` loses
    its oldest turns whole (system turns and the last user turn stay; counted in ``rep``)."""
    if not isinstance(g.prompt, list):
        return g.prompt
    from align.tokens import encode, specials
    sp = specials(tokenizer)

    def fits(msgs):
        for p, t in _pair_texts(g, msgs, tokenizer, chat_template):
            c, ended = sp.cut_at_stop(encode(tokenizer, t, bos=False))
            if len(encode(tokenizer, p, bos=True)) + len(c) + (not ended) > max_length:
                return False
        return True

    prompt, dropped = drop_oldest_turns(g.prompt, fits)
    rep.prompt_turns_dropped += dropped
    return prompt


def tokenize_group(g: Group, tokenizer, max_length: int, chat_template=None, report=None) -> TokenGroup | None:
    """Every completion as prompt + completion ids ending at its stop token (align/tokens.py).
    A conversation prompt too long for ``max_length`` first loses its oldest turns whole, then
    tokens from the left. Truncation is counted in ``report`` (a ``TruncationReport``); a group in
    which any completion lost its end is refused (None, counted as dropped): the reward is read at
    the last token, and a cut response would be scored at an arbitrary one."""
    from align.data.sft import TruncationReport, tokenize_pair
    rep = report if report is not None else TruncationReport()
    seqs, plens, cut = [], [], False
    prompt = _fitting_prompt(g, tokenizer, max_length, chat_template, rep)
    for p, t in _pair_texts(g, prompt, tokenizer, chat_template):
        before = rep.completion_truncated
        pi, ci = tokenize_pair(p, t, tokenizer, max_length, rep)
        cut = cut or rep.completion_truncated > before
        seqs.append(pi + ci)
        plens.append(len(pi))
    if cut:
        rep.dropped += 1
        return None
    return TokenGroup(seqs, list(g.ranks), g.margin, g.weight, plens)


def tokenize_groups(groups: list[Group], tokenizer, max_length: int, chat_template=None,
                    where: str = "data") -> tuple[list[TokenGroup], "object", list[int]]:
    """``tokenize_group`` over ``groups``: (kept groups, TruncationReport, indices of the refused
    records). Fails, naming ``where``, when no group is left."""
    from align.data.sft import TruncationReport
    rep = TruncationReport()
    kept, refused = [], []
    for i, g in enumerate(groups):
        tg = tokenize_group(g, tokenizer, max_length, chat_template, rep)
        if tg is None:
            refused.append(i)
        else:
            kept.append(tg)
    if groups and not kept:
        raise ValueError(f"{where}: every record has a completion longer than data.max_length={max_length} "
                         f"on its own; raise data.max_length")
    return kept, rep, refused


def collate_groups(groups: list[TokenGroup], pad_id: int, padding_side: str = "right") -> dict:
    seqs = [s for g in groups for s in g.sequences]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    plens = [p for g in groups for p in g.prompt_lengths]
    completion = torch.zeros((len(seqs), t), dtype=torch.bool) if len(plens) == len(seqs) else None
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
        if completion is not None:
            completion[i, sl.start + plens[i]:sl.stop] = True
    extra = {} if completion is None else {"completion_mask": completion}
    return {"input_ids": ids, "attention_mask": mask, **extra,
            "group": torch.tensor([gi for gi, g in enumerate(groups) for _ in g.sequences]),
            "ranks": torch.tensor([r for g in groups for r in g.ranks], dtype=torch.float),
            "margin": torch.tensor([g.margin for g in groups]),
            "weight": torch.tensor([g.weight for g in groups])}


def tokenize_train_and_eval(groups: list[Group], eval_groups: list[Group], tokenizer, data, log, stage: str):
    """Both splits of a preference stage (reward, DPO) tokenized with ``data.max_length`` and
    ``data.chat_template``; truncation is logged through ``log`` when any happened. Returns
    (train groups, eval groups, the truncation record for summary.json)."""
    tgroups, report, refused = tokenize_groups(groups, tokenizer, data.max_length, data.chat_template,
                                               where=str(data.train))
    egroups, ereport, erefused = tokenize_groups(eval_groups, tokenizer, data.max_length, data.chat_template,
                                                 where="eval")
    if (report.prompt_truncated or report.prompt_turns_dropped or report.completion_truncated
            or ereport.completion_truncated):
        log(f"[{stage}] truncation (max_length={data.max_length}): train {report.as_dict()}, "
            f"eval {ereport.as_dict()}; records refused because a completion lost its end: "
            f"train {refused[:20]}{' ...' if len(refused) > 20 else ''}, eval {erefused[:20]}")
    return tgroups, egroups, {"train": report.as_dict(), "eval": ereport.as_dict(),
                              "refused_train_records": refused, "refused_eval_records": erefused}
