"""The attention function that lets adapters act inside attention.

transformers routes attention through ``AttentionInterface``; we register ``"align"``, which
prepends the active adapter sets' extra key/value (prefix tuning) in front of the layer's own and
widens the mask, then calls the *core* attention: transformers' own implementation named by the
model's ``model.attn_implementation`` (``AlignModel(backbone, attn_implementation=...)``):

* ``sdpa`` (default): ``transformers.integrations.sdpa_attention.sdpa_attention_forward``;
* ``eager``: the model's own ``eager_attention_forward`` (the function of its modeling file that
  transformers uses for ``attn_implementation="eager"``: Gemma's applies ``softcap`` when given);
* ``flex_attention``: transformers' ``ALL_ATTENTION_FUNCTIONS["flex_attention"]``.

Flash-attention kernels are refused (``align.arch.attn_implementation_problem``): they take a 2-D
padding mask and a causal flag, not the 4-D mask align builds.

Active sets with an ``attention_output(layer_idx, module, query)`` method (LLaMA-Adapter) may then
add a tensor [B, T, H, D] to the attention output (before the output projection); they see the
layer's own queries, RoPE (and QK-norm) already applied. With no such set active it is exactly the
core function. Every keyword transformers passes (``scaling``, ``dropout``, ``softcap``, ...) goes
to the core function unchanged, except ``sliding_window``, which is applied here to the mask.
``AlignModel`` always passes its own 4-D boolean mask (True = attend), so the mask arriving here is
a tensor; a ``None`` mask (someone else calling the model with plain causal attention) is rebuilt.
Eager attention adds the mask to the scores, so a boolean mask becomes an additive one (0 / the
dtype's minimum); flex attention gets it as a ``BlockMask``, as transformers gives it; sdpa takes
it as it is.

Sliding-window layers (Mistral, Qwen2/Qwen3 with ``use_sliding_window``, Gemma-3's local layers)
receive ``sliding_window`` from transformers; the window is applied here to that mask (a query
attends to keys less than ``sliding_window`` positions behind it, transformers' rule). Left
padding sits in front of every row and virtual tokens in front of the prompt, so column distance
is position distance. Prefix key/values are added after the window: every query sees them, as in
peft, where they are the cache's first entries.
"""
from __future__ import annotations

import functools
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "align"
DEFAULT = "sdpa"


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


def core_function(attention_class: type, implementation: str):
    """transformers' attention function ``implementation`` for layers of ``attention_class``
    (looked up at each call: nothing holds on to a function another module may replace)."""
    if implementation == "sdpa":
        return sdpa_attention_forward
    return _named_function(attention_class, implementation)


@functools.cache
def _named_function(attention_class: type, implementation: str):
    if implementation == "eager":
        fn = getattr(sys.modules[attention_class.__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{attention_class.__name__} ({attention_class.__module__}) has no "
                             f"eager_attention_forward; use model.attn_implementation=sdpa")
        return fn
    return ALL_ATTENTION_FUNCTIONS[implementation]


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend) as the additive mask eager attention adds to the scores."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def block_mask(mask: torch.Tensor | None, batch: int):
    """A boolean mask [B|1, 1, Q, K] as the ``BlockMask`` transformers hands flex attention. (Given
    as an additive tensor instead, flex adds it in its ``score_mod``; on CPU that crashed or gave
    NaN for torch 2.13's compiled kernel.)"""
    if mask is None or mask.dtype != torch.bool:
        return mask
    from torch.nn.attention.flex_attention import create_block_mask
    m = mask.expand(batch, -1, -1, -1)

    def mask_mod(b, h, q, k):
        return m[b, 0, q, k]
    return create_block_mask(mask_mod, batch, None, m.shape[2], m.shape[3], device=m.device, _compile=False)


def align_attention(module, query, key, value, attention_mask, **kwargs):
    owner = getattr(module, "_align_owner", None)
    implementation = getattr(owner, "attn_implementation", DEFAULT)
    b, _, q_len, _ = query.shape
    if owner is not None and owner.record_kv is not None:     # a shared prompt's pass: keep its keys/values
        owner.record_kv[module.layer_idx] = (key, value)
    if owner is not None and owner.prompt_kv is not None:     # the rest of its rows: the prompt's in front
        pk, pv = owner.prompt_kv[module.layer_idx]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    window = kwargs.pop("sliding_window", None)
    if window is not None:
        attention_mask = apply_sliding_window(attention_mask, int(window), q_len, key.shape[2], b, query.device)
    extra = owner.attention_extra(module.layer_idx, b) if owner is not None else None
    if extra is not None:
        pk, pv = extra  # [B, H_kv, P, D]
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
    if implementation != "sdpa":
        if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
            attention_mask = causal_bool_mask(b, q_len, key.shape[2], query.device)
        attention_mask = (block_mask(attention_mask, b) if implementation == "flex_attention"
                          else additive(attention_mask, query.dtype))
    fn = core_function(type(module), implementation)
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
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
