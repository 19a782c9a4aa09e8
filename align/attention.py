"""The attention function that lets adapters act inside attention.

transformers routes attention through ``AttentionInterface``; we register ``"align"``, which
prepends the active adapter sets' extra key/value (prefix tuning) in front of the layer's own and
widens the mask, then calls the stock sdpa function. Active sets with an
``attention_output(layer_idx, module, query)`` method (LLaMA-Adapter) may then add a tensor
[B, T, H, D] to the attention output (before the output projection); they see the layer's own
queries, RoPE already applied. With no such set active it is exactly sdpa.
``AlignModel`` always passes its own 4-D boolean mask (True = attend), so the mask arriving here is
a tensor; a ``None`` mask (someone else calling the model with plain causal attention) is rebuilt.

Sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``) receive ``sliding_window`` from
transformers; the window is applied here to that mask (a query attends to keys less than
``sliding_window`` positions behind it, transformers' rule). Left padding sits in front of every
row and virtual tokens in front of the prompt, so column distance is position distance.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "align"


def causal_bool_mask(batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """[B,1,Q,K] causal mask for queries at the last ``q_len`` of ``kv_len`` positions."""
    q_abs = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return (k <= q_abs)[None, None].expand(batch, 1, q_len, kv_len)


def apply_sliding_window(mask: torch.Tensor | None, window: int | None, q_len: int, kv_len: int,
                         batch: int, device) -> torch.Tensor | None:
    """``mask`` [B,1,Q,K] (bool, True = attend, or additive float) restricted to keys fewer than
    ``window`` columns behind each query (queries are the last ``q_len`` of ``kv_len`` columns)."""
    if window is None or window >= kv_len:
        return mask
    q_abs = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    band = (q_abs - k < window)[None, None]
    if mask is None:
        mask = causal_bool_mask(batch, q_len, kv_len, device)
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def align_attention(module, query, key, value, attention_mask, **kwargs):
    window = kwargs.pop("sliding_window", None)
    if window is not None:
        attention_mask = apply_sliding_window(attention_mask, int(window), query.shape[2], key.shape[2],
                                              query.shape[0], query.device)
    owner = getattr(module, "_align_owner", None)
    extra = owner.attention_extra(module.layer_idx, query.shape[0]) if owner is not None else None
    if extra is not None:
        pk, pv = extra  # [B, H_kv, P, D]
        b, _, q_len, _ = query.shape
        if attention_mask is None:
            attention_mask = causal_bool_mask(b, q_len, key.shape[2], query.device)
        p = pk.shape[2]
        if attention_mask.dtype == torch.bool:
            pad = torch.ones(b, 1, q_len, p, dtype=torch.bool, device=query.device)
        else:  # additive float mask
            pad = torch.zeros(b, 1, q_len, p, dtype=attention_mask.dtype, device=query.device)
        attention_mask = torch.cat([pad.expand(attention_mask.shape[0], -1, -1, -1)
                                    if attention_mask.shape[0] != b else pad, attention_mask], dim=-1)
        key = torch.cat([pk.to(key.dtype), key], dim=2)
        value = torch.cat([pv.to(value.dtype), value], dim=2)
        kwargs.pop("is_causal", None)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if owner is not None:
        for s in owner.live_sets():
            fn = getattr(s, "attention_output", None)
            add = fn(module.layer_idx, module, query) if fn is not None else None
            if add is not None:
                out = out + add.to(out.dtype)
    return out, weights


def register() -> str:
    AttentionInterface.register(NAME, align_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
