"""Sampling from a role with the KV cache.

Our own small loop rather than ``transformers.generate`` because every role's adapters (prefix
key/values, virtual tokens at prefill only, hooks) must be live, positions must follow the
left-padded mask exactly as in the training forward, and the log-probabilities of the sampled
tokens must come from the same temperature-warped distribution that PPO later recomputes.
Pure sampling in training: no top-k/top-p and no minimum length, which would make the sampling
distribution differ from the one PPO optimises (docs/ppo-notes.md §B5). ``top_p < 1`` (nucleus
sampling) exists for ``align generate`` only; no stage passes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from align.arch import longrope_switch
from align.model import distinct_rows


@dataclass
class Samples:
    tokens: torch.Tensor     # [B, max_new_tokens]; after the first stop token everything is PAD
    logprobs: torch.Tensor   # [B, max_new_tokens] log pi(token) under logits / temperature
    lengths: torch.Tensor    # [B] number of tokens up to and including the stop token
    values: torch.Tensor | None = None   # [B, max_new_tokens] ``head`` at each sampled token's position


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, role: str,
           max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
           stop_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
           generator: torch.Generator | None = None, use_cache: bool = True,
           row_seeds: list[int] | None = None, all_done=None, top_p: float = 1.0,
           shared_prompt: bool = False, head: str | None = None) -> Samples:
    """Sample continuations of left-padded prompts from ``role``.

    ``row_seeds`` gives each row its own random stream (Gumbel-max with noise seeded by the row's
    seed and the step), so a row's sample does not depend on which other rows share its batch or
    process: runs with different world sizes or micro-batches sample the same tokens.
    With ``use_cache=False`` every step re-runs the whole sequence (used by tests to check the
    cache gives the same tokens). ``stop_token_id`` is one id or several (``Specials.stop_ids``:
    EOS, the checkpoint's other EOS ids, the chat template's end of turn); a row stops at the first.
    ``shared_prompt`` (with the cache): rows with the same prompt (a group's samples) prefill it
    once and continue from copies of its keys/values (the same logits up to float rounding).
    ``head``: also read that scalar head on the hidden state each sampled token is drawn from (a
    value head on the sampling role's adapters: the values a scoring pass would give, without it).
    ``all_done`` (``Runtime.generation``: ZeRO-3 sampling layer by layer, where every forward is a
    collective) turns "this process's rows all stopped" into "every process's rows stopped".
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
    b = input_ids.shape[0]
    device = input_ids.device
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stops = None if stop_token_id is None else torch.tensor(
        [stop_token_id] if isinstance(stop_token_id, int) else list(stop_token_id), dtype=torch.long, device=device)
    tokens, logps, values = [], [], []
    seq, mask = input_ids, attention_mask.long()
    cache = DynamicCache() if use_cache else None
    past_mask = None
    step_ids, step_mask = seq, mask
    long_after = longrope_switch(model.backbone) if use_cache else None
    cache_long = False   # the cache holds keys rotated with longrope's long factors
    groups = distinct_rows(torch.cat([seq, mask], 1)) if shared_prompt and use_cache and b > 1 else None
    with model.use(role):
        shift = sum(s.num_prefix_positions() for s in model.live_sets())
        for step in range(max_new_tokens):
            out = _forward_step(model, step_ids, step_mask, cache, past_mask, groups if step == 0 else None)
            logits = out.logits[:, -1].float()
            if head is not None:
                values.append(model.heads[head](out.hidden[:, -1]).float())
            logp_all = torch.log_softmax(logits / temperature, dim=-1)
            nxt = _next_token(logp_all, greedy, row_seeds, generator, len(tokens), top_p)
            lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            lp = torch.where(done, torch.zeros_like(lp), lp)
            tokens.append(nxt)
            logps.append(lp)
            if stops is not None:
                is_stop = torch.isin(nxt, stops)
                done = done | is_stop
                new_mask = (~done | is_stop).long()[:, None]
            else:
                new_mask = torch.ones(b, 1, dtype=torch.long, device=device)
            if use_cache:
                cache, past_mask = out.cache, out.mask
                step_ids, step_mask = nxt[:, None], new_mask
                if long_after is not None and not cache_long:
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
                    mask = torch.cat([mask, new_mask], dim=1)
                    # the largest position + 1 of the next forward (positions count real tokens)
                    if int(torch.cat([past_mask, new_mask], 1).sum(1).max()) + shift > long_after:
                        cache_long = True
                        if int(past_mask.sum(1).max()) + shift <= long_after:
                            # it switches to the long factors: rebuild the cache under them
                            cache, past_mask, step_ids, step_mask = DynamicCache(), None, seq, mask
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                mask = torch.cat([mask, new_mask], dim=1)
                step_ids, step_mask = seq, mask
            finished = bool(done.all())
            if all_done(finished) if all_done is not None else finished:
                break
    return _finish(torch.stack(tokens, 1), torch.stack(logps, 1), stops, max_new_tokens, pad_token_id,
                   torch.stack(values, 1) if values else None)


def _forward_step(model, ids, mask, cache, past_mask, groups):
    """One sampling forward, logits at the last position; with ``groups`` (the prefill of rows that
    share prompts: ``distinct_rows``) each distinct prompt runs once and the cache, logits, hidden
    states and mask are copied to its rows."""
    if groups is None or len(groups[0]) == ids.shape[0]:
        return model(ids, mask, cache=cache, past_mask=past_mask, logits=True, logits_at=slice(-1, None))
    first, inverse = groups
    out = model(ids[first], mask[first], cache=cache, past_mask=None, logits=True, logits_at=slice(-1, None))
    cache.batch_select_indices(inverse)
    return out._replace(logits=out.logits[inverse], mask=out.mask[inverse], hidden=out.hidden[inverse])


def _finish(toks: torch.Tensor, lps: torch.Tensor, stops, max_new_tokens: int, pad_token_id: int,
            values: torch.Tensor | None = None) -> Samples:
    """The sampled tokens, log-probs (and values) padded to ``max_new_tokens`` (when every row
    stopped early), with each row's length up to and including its first stop token."""
    b, device = toks.shape[0], toks.device
    if toks.shape[1] < max_new_tokens:  # everyone stopped early: pad to the fixed length
        extra = max_new_tokens - toks.shape[1]
        toks = torch.cat([toks, toks.new_full((b, extra), pad_token_id)], 1)
        lps = torch.cat([lps, lps.new_zeros(b, extra)], 1)
        if values is not None:
            values = torch.cat([values, values.new_zeros(b, extra)], 1)
    if stops is not None:
        is_stop = torch.isin(toks, stops)
        has = is_stop.any(1)
        first = torch.where(has, is_stop.float().argmax(1), torch.full_like(has, max_new_tokens, dtype=torch.long))
        lengths = torch.where(has, first + 1, torch.full_like(first, max_new_tokens))
    else:
        lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    return Samples(toks, lps, lengths, values)


def nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logp`` [B, V] with every token outside the top-``top_p`` nucleus set to -inf (the most
    likely token always stays)."""
    sorted_lp, order = logp.sort(-1, descending=True)
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()   # probability mass ranked above each token
    drop = before >= top_p
    drop[:, 0] = False
    return logp.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def _next_token(logp_all: torch.Tensor, greedy: bool, row_seeds, generator, step: int, top_p: float) -> torch.Tensor:
    """One token per row: argmax, Gumbel-max with per-row seeds, or a multinomial draw."""
    device = logp_all.device
    if greedy:
        return logp_all.argmax(-1)
    if top_p < 1.0:
        logp_all = nucleus(logp_all, top_p)
    if row_seeds is not None:
        u = torch.stack([torch.rand(logp_all.shape[-1], device=device, generator=torch.Generator(
            device=device).manual_seed(int(s) * 1_000_003 + step)) for s in row_seeds])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return (logp_all + gumbel).argmax(-1)
    return torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
