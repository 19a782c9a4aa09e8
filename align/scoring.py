"""Sampling and scoring responses: the one place that does "sample → cut at the stop token → mask
→ score under a role".

PPO's rollout and evaluation, ``align eval`` and the reward stage's normalisation all go through
here, so they agree on where a response ends (align/tokens.py), which positions are real, where
the reward is read (the last real token) and how log-probabilities are taken (at the sampling
temperature, logits only at the response positions).
"""
from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from align.generation import sample
from align.lmhead import bare, fused_head, token_logprobs
from align.rl.functional import entropy_from_logits, logprobs_from_logits
from align.rl.rollout import response_mask_from_lengths, truncate_after_stop
from align.rundir import RunDir
from align.tokens import specials


@dataclass
class Responses:
    query: torch.Tensor            # [B, Q] left-padded prompt ids
    query_mask: torch.Tensor       # [B, Q]
    response: torch.Tensor         # [B, R] PAD after the first stop token
    response_mask: torch.Tensor    # [B, R] bool: real response tokens (the stop token included)
    seq_lengths: torch.Tensor      # [B] index of the last real response token
    has_stop: torch.Tensor         # [B] bool
    sample_logprobs: torch.Tensor  # [B, R] the sampler's log-probs at its temperature
    generate_s: float = 0.0        # wall time of the sampling
    sample_values: torch.Tensor | None = None   # [B, R] the sampler's ``head`` values, where asked


def left_pad(seqs: list[list[int]], pad_id: int, device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a left-padded [B, width] batch and its mask."""
    t = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
    return ids.to(device), mask.to(device)


def generate(model, prompt_ids: list[list[int]], tok, device, *, role: str, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False, width: int | None = None,
             generator: torch.Generator | None = None, row_seeds: list[int] | None = None,
             runtime=None, top_p: float = 1.0, shared_prompt: bool = False, head: str | None = None) -> Responses:
    """Sample a response to each prompt from ``role`` and cut it after its first stop token.
    ``runtime`` (the stage's ``Runtime``; every process must call this when one is given) makes
    ZeRO-3-partitioned parameters available for sampling (``Runtime.generation``). ``top_p < 1``:
    nucleus sampling, for ``align generate`` only (training samples the full distribution).
    ``shared_prompt``: one prefill per distinct prompt; ``head``: that head's values at the sampled
    positions too (``generation.sample``)."""
    query, qmask = left_pad(prompt_ids, tok.pad_token_id, device, width=width)
    stops = specials(tok).stop_ids
    t0 = time.time()
    with runtime.generation(model) if runtime is not None else contextlib.nullcontext() as all_done:
        s = sample(model, query, qmask, role=role, max_new_tokens=max_new_tokens, temperature=temperature,
                   greedy=greedy, stop_token_id=stops, pad_token_id=tok.pad_token_id, generator=generator,
                   row_seeds=row_seeds, all_done=all_done, top_p=top_p, shared_prompt=shared_prompt, head=head)
    generate_s = time.time() - t0
    response, seq_lengths, has_stop = truncate_after_stop(s.tokens, stops, tok.pad_token_id)
    rmask = response_mask_from_lengths(seq_lengths, response.shape[1])
    return Responses(query, qmask, response, rmask, seq_lengths, has_stop, s.logprobs, generate_s, s.values)


def decode(tok, resp: Responses) -> list[str]:
    """The responses' text (special tokens, the stop token included, left out)."""
    return [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(resp.response, resp.response_mask)]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding."""
    t = mask.shape[1]
    return t - 1 - mask.long().flip(1).argmax(1)


def sequence_rewards(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar head's output at each row's last real token (a response's stop token)."""
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def response_stats(model, query, qmask, response, rmask, roles, temperature, *, logits: bool = False,
                   entropy: bool = False, shared_prompt: bool = False) -> dict:
    """Log-probs (at ``temperature``) and values of ``response`` under ``roles``, in one module
    call (one forward per backward for DDP/DeepSpeed); a role with a head gives ``values`` and
    ``score`` (its value at the last real token), a role without one ``logprobs``, and with
    ``entropy`` the entropy of each position's distribution (no gradient). ``logits=True`` also
    returns ``logits`` [B, R, V]; otherwise they are not kept: where the LM head allows
    (``align.lmhead.fused_head``: frozen, unsharded) the log-probs come from the hidden states a
    chunk of positions at a time, else the logits are computed only at the positions that
    predict response tokens and dropped after use. ``shared_prompt``: rows with the same prompt
    (a group's samples) run it once (``AlignModel.forward(shared_prompt=...)``)."""
    ids = torch.cat([query, response], 1)
    mask = torch.cat([qmask, rmask.long()], 1)
    q = query.shape[1]
    inner = bare(model)
    fused = not logits and fused_head(inner) is not None
    outs = model(ids, mask, roles=tuple(roles), logits=False if fused else None, logits_at=slice(q - 1, -1),
                 shared_prompt=q if shared_prompt else None)
    res = {}
    for r, o in outs.items():
        if o.values is not None:
            res[r] = {"values": o.values[:, q - 1:-1].float(), "score": sequence_rewards(o.values.float(), mask)}
        elif fused:
            lp, ent = token_logprobs(inner, o.hidden[:, q - 1:-1], response, temperature, entropy=entropy)
            res[r] = {"logprobs": lp, **({"entropy": ent} if entropy else {})}
        else:
            res[r] = {"logprobs": logprobs_from_logits(o.logits, response, temperature)}
            if entropy:
                with torch.no_grad():
                    res[r]["entropy"] = entropy_from_logits(o.logits, temperature)
            if logits:
                res[r]["logits"] = o.logits
    return res


def score(engine, resp: Responses, roles, temperature: float, micro_batch_size: int,
          rows: slice | None = None, shared_prompt: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``response_stats`` over ``resp`` in chunks of ``micro_batch_size`` rows, concatenated:
    ``{role: {"logprobs"|"values"|"score": tensor}}``; ``shared_prompt``: as ``response_stats``."""
    n = resp.response.shape[0]
    parts: dict[str, dict[str, list]] = {}
    for i in range(0, n, micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        st = response_stats(engine, resp.query[sl], resp.query_mask[sl], resp.response[sl],
                            resp.response_mask[sl], roles, temperature, shared_prompt=shared_prompt)
        for r, d in st.items():
            for k, v in d.items():
                parts.setdefault(r, {}).setdefault(k, []).append(v)
    return {r: {k: torch.cat(v) for k, v in d.items()} for r, d in parts.items()}


def load_callable(spec: str) -> Callable | None:
    """``"module:function"`` (a gold scorer or programmatic reward) or a built-in verifier's bare
    name (align/verifiers.py) → the function; "" → None."""
    if not spec:
        return None
    from align.verifiers import resolve
    spec = resolve(spec)
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"{spec!r} is not of the form module:function")
    return getattr(importlib.import_module(mod), fn)


def reward_set_name(entry_name: str, prefix: str = "reward") -> str:
    """The adapter-set name a reward run's stack entry gets in a model (``load_reward_role``)."""
    return prefix if entry_name == "reward" else f"{prefix}_{entry_name}"


def load_reward_role(model, reward_run: str | Path, *, sft_dir: Path | None = None, role: str = "reward",
                     prefix: str = "reward") -> tuple[list[str], dict]:
    """Load the reward stage's role (its adapter stack and head) into ``model`` as ``role``.
    An adapter of the stack that is ``sft_dir`` itself reuses the loaded ``sft`` set (the same
    frozen adapters, not a second copy). Returns (the stack's set names, the normalisation)."""
    from align.adapters.peft_format import load_adapter, load_head
    run = RunDir(reward_run)
    rr = run.role("reward")
    if rr is None:
        raise ValueError(f"{run.path} has no reward role ({run.roles_file().name}); give a finished reward run")
    stack = []
    for entry in rr["adapters"]:
        d = run.resolve(entry["dir"])
        if entry["name"] == "sft" and sft_dir is not None and "sft" in model.adapters \
                and d.resolve() == Path(sft_dir).resolve():
            stack.append("sft")
            continue
        name = reward_set_name(entry["name"], prefix)
        load_adapter(model, name, d)
        stack.append(name)
    head_rec = load_head(model, role, run.resolve(rr["head"]))
    model.add_role(role, stack, head=role)
    return stack, head_rec.get("normalisation") or rr.get("normalisation") or {"mean": 0.0, "std": 1.0}


SCORER_ARGS = ("prompts", "responses", "completions", "ended")   # what a scorer gets positionally


def call_scorer(fn: Callable, prompts: list[dict], responses: list[str], ended: list[bool]) -> list:
    """Call a programmatic reward or gold scorer: ``fn(prompt texts, responses, ended, **columns)``
    (TRL's convention), where ``columns`` are the prompt records' other fields, each a list with one
    entry per response (None where a record lacks the field). A scorer receives the columns it
    names as parameters, or all of them when it takes ``**kwargs``; one with three parameters
    receives none, so ``fn(prompts, responses, ended)`` keeps working."""
    from align.rules import keyword_parameters
    names = sorted({k for p in prompts for k in p.get("columns", {})} - set(SCORER_ARGS))
    kwargs = {k: [p.get("columns", {}).get(k) for p in prompts] for k in names}
    params = keyword_parameters(fn, 3)
    if params is None:   # a builtin without a signature: positional arguments only
        kwargs = {}
    elif not params[2]:
        kwargs = {k: v for k, v in kwargs.items() if k in params[0]}
    return fn([p["text"] for p in prompts], responses, ended, **kwargs)


@torch.no_grad()
def evaluate_role(model, engine, prompts: list[dict], tok, device, *, role: str, temperature: float,
                  max_new_tokens: int, generator=None, micro_batch_size: int = 32,
                  reward_mix=None, reward_role: str = "reward",
                  reference: str = "reference", runtime=None) -> dict:
    """Sample from ``role`` on ``prompts`` (``{"text", "ids"}``); the responses' text, raw reward
    (the reward role's, or with ``reward_mix`` -- an ``align.rewardmix.RewardMix`` -- the weighted
    sum of its sources' raw values), summed KL to ``reference`` and whether each ended."""
    resp = generate(model, [p["ids"] for p in prompts], tok, device, role=role, max_new_tokens=max_new_tokens,
                    temperature=temperature, generator=generator, runtime=runtime)
    with_role = reward_mix is None or reward_mix.uses_role
    roles = (role, reference) + ((reward_role,) if with_role else ())
    st = score(engine, resp, roles, temperature, micro_batch_size)
    kl = ((st[role]["logprobs"] - st[reference]["logprobs"]) * resp.response_mask).sum(1)
    texts = decode(tok, resp)
    if reward_mix is not None:
        parts = reward_mix.parts(prompts, texts, resp.has_stop.tolist(), st[reward_role]["score"] if with_role
                                 else None, 0, kl.device)
        reward = reward_mix.combine(parts, normalised=False)
    else:
        reward = st[reward_role]["score"]
    return {"responses": texts, "reward": reward.float().cpu(), "kl": kl.float().cpu(),
            "ended": resp.has_stop.cpu().tolist()}
