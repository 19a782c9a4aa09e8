"""LLaMA-Adapter (Zhang et al. 2023) with zero-init attention, as HF peft's ADAPTION_PROMPT.

In each of the top L layers (``adapter_layers``) an adaption prompt ``P_l`` [K, hidden]
(K = ``num_virtual_tokens``, N(0, 1) init) is projected by that layer's *frozen* key and value
projections. The layer's queries attend to these K keys through their own softmax (no mask, no
RoPE on the prompt keys; the queries are the layer's own, RoPE-rotated), the result is multiplied
by a scalar gate ``g_l`` initialised to zero and added to the attention output:

    out_l = attn_l(x) + g_l * softmax(q k_P^T / sqrt(d_head)) v_P

so a fresh set is exactly the backbone. This follows peft (one scalar gate per layer, no tanh;
the paper's code has per-head gates):

* llama-like (llama, mistral, and qwen2 through the same code): the gated output is added in
  head space inside attention, before ``o_proj`` (``attention_output``, called by
  ``align.attention``), i.e. ``o_proj(attn + adapter)``; peft computes ``o_proj(attn) +
  o_proj(adapter)``, the same since these ``o_proj`` have no bias. GQA: the prompt's K/V heads
  are repeated like the layer's own.
* gpt2: peft adds the gated output *after* ``c_proj`` without projecting it, so here it is an
  "out" hook on the attention module that recomputes the queries from ``c_attn``.
* phi3 and gpt_neox (peft has no adaption prompt for them): the llama-like way, inside attention
  before the output projection (``o_proj`` / ``dense``, whose bias is then added once). The prompt's
  keys and values are the key and value rows of the layer's fused projection (``qkv_proj`` /
  ``query_key_value``, bias included) applied to the prompt, sliced as ``Arch.split_qkv`` says:
  phi3's stacked grouped-query ``[q | k | v]``, GPT-NeoX's per-head interleaved ``[H, 3, D]``.
  The queries are the layer's own, partially rotated as the model rotates them.
* QK-norm families (qwen3, gemma3_text), which peft's adaption prompt does not serve: the prompt
  keys get the layer's own key treatment except RoPE, ``k_norm(k_proj(P_l))`` per head, and the
  scores the layer's own softmax scale (``module.scaling``: Gemma-3's ``query_pre_attn_scalar^-1/2``),
  so the prompt keys live where the layer's keys live. Saved in peft's layout all the same
  (peft itself refuses these model types for ADAPTION_PROMPT).

peft layout: ``base_model.model.<attn path>.adaption_prompt`` [1, K, hidden] and
``….adaption_gate`` [1] for the top L layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.arch import Arch, compute_dtype
from align.rules import AT_LEAST_ONE

SUPPORTED = {"llama", "mistral", "qwen2", "gpt2", "phi3", "gpt_neox", "qwen3", "gemma3_text"}  # peft: llama, mistral, gpt2
QK_NORM = {"qwen3", "gemma3_text"}  # prompt keys through the layer's k_norm, scores at its own scale


@register
class LlamaAdapter(AdapterSet):
    method = "llama_adapter"
    merge_refusal = ("adds gated adaption prompts inside the top layers' attention, which no backbone "
                     "weight can express; use --format peft (ADAPTION_PROMPT)")
    peft_type = "ADAPTION_PROMPT"
    settings = {"num_virtual_tokens": AT_LEAST_ONE, "adapter_layers": AT_LEAST_ONE}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        if arch.model_type not in SUPPORTED:
            # e.g. olmo2 normalises q and k over all heads at once, gemma (1) scales its embeddings:
            # the prompt keys would need that model's own treatment, which peft does not define either
            raise NotImplementedError(f"llama_adapter supports model types {sorted(SUPPORTED)}, "
                                      f"not {arch.model_type!r}")
        n_layers, k = config.adapter_layers, config.num_virtual_tokens
        if not 1 <= n_layers <= arch.num_layers:
            raise ValueError(f"adapter_layers={n_layers} must be in 1..{arch.num_layers} (the backbone's layers)")
        if k < 1:
            raise ValueError("num_virtual_tokens (adaption prompt length) must be >= 1")
        self.layers = list(range(arch.num_layers - n_layers, arch.num_layers))
        self.prompts = nn.ParameterDict(
            {str(i): nn.Parameter(torch.randn(1, k, arch.hidden_size)) for i in self.layers})
        self.gates = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(1)) for i in self.layers})
        # gpt2's fused projection, held in a plain dict so it is not registered as a submodule
        self._qkv = {i: backbone.get_submodule(f"{arch.attn_path(i)}.{arch.k_proj}") for i in self.layers} \
            if arch.family == "gpt2" else {}

    def gated_attention(self, i: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        k_norm: nn.Module | None = None, scaling: float | None = None):
        """query [B, H, T, D]; key/value [1, K, H_kv * D] -> gated output [B, T, H, D]. ``k_norm``
        (per head) and ``scaling`` (else 1/sqrt(D)): a QK-norm layer's own key norm and scale."""
        a = self.arch
        kk = key.view(1, -1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        vv = value.view(1, -1, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if k_norm is not None:
            kk = k_norm(kk)
        rep = a.num_heads // a.num_kv_heads
        if rep > 1:
            kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
        scores = query @ kk.transpose(2, 3).to(query.dtype)
        scores = scores / math.sqrt(a.head_dim) if scaling is None else scores * scaling
        probs = self.gates[str(i)] * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return (probs.to(vv.dtype) @ vv).transpose(1, 2)

    # llama-like: inside attention, with the layer's rotated queries (see align.attention)
    def attention_output(self, layer_idx: int, module: nn.Module, query: torch.Tensor):
        if self.arch.family == "gpt2" or str(layer_idx) not in self.prompts:
            return None
        p = self.prompts[str(layer_idx)]
        k_proj, v_proj = getattr(module, self.arch.k_proj), getattr(module, self.arch.v_proj)
        p = p.to(compute_dtype(k_proj, query.dtype))  # not the uint8 of a 4-bit layer
        if self.arch.fused_qkv:  # phi3, gpt_neox: the key and value rows of the fused layer
            _, k, v = self.arch.split_qkv(k_proj(p))
            return self.gated_attention(layer_idx, query, k, v)
        if self.arch.model_type in QK_NORM:
            return self.gated_attention(layer_idx, query, k_proj(p), v_proj(p), module.k_norm, module.scaling)
        return self.gated_attention(layer_idx, query, k_proj(p), v_proj(p))

    # gpt2: after the attention block (after c_proj), as peft does
    def hook_points(self):
        if self.arch.family != "gpt2":
            return {}
        return {(self.arch.attn_path(i), "out"): self._gpt2_hook(i) for i in self.layers}

    def _gpt2_hook(self, i: int):
        qkv, d = self._qkv[i], self.arch.hidden_size

        def add(x, out):
            b, t, _ = x.shape
            q = qkv(x)[..., :d].view(b, t, self.arch.num_heads, self.arch.head_dim).transpose(1, 2)
            _, k, v = qkv(self.prompts[str(i)].to(x.dtype)).split(d, dim=2)
            return out + self.gated_attention(i, q, k, v).reshape(b, t, d).to(out.dtype)
        return add

    def expected_num_params(self) -> int:
        return len(self.layers) * (self.config.num_virtual_tokens * self.arch.hidden_size + 1)

    # --- HF peft layout ---------------------------------------------------------------------
    def peft_config(self) -> dict:
        return {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM",
                "adapter_len": self.config.num_virtual_tokens, "adapter_layers": self.config.adapter_layers,
                "target_modules": self.arch.attn_name, "inference_mode": True}

    def export_state_dict(self):
        out = {}
        for i in self.layers:
            base = f"base_model.model.{self.arch.attn_path(i)}"
            out[f"{base}.adaption_prompt"] = self.prompts[str(i)].detach()
            out[f"{base}.adaption_gate"] = self.gates[str(i)].detach()
        return out

    def import_state_dict(self, sd):
        expected = set(self.export_state_dict())
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd))[:3], sorted(set(sd) - expected)[:3]
            raise ValueError(f"adaption-prompt tensors do not match the top {len(self.layers)} layers: "
                             f"missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for i in self.layers:
                base = f"base_model.model.{self.arch.attn_path(i)}"
                self.prompts[str(i)].copy_(sd[f"{base}.adaption_prompt"])
                self.gates[str(i)].copy_(sd[f"{base}.adaption_gate"])

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        return AdapterConfig(method="llama_adapter", num_virtual_tokens=p["adapter_len"],
                             adapter_layers=p["adapter_layers"])
