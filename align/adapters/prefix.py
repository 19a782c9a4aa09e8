"""Prefix tuning (Li & Liang 2021): trainable key/value vectors for every layer.

Stored as peft stores them: ``prompt_embeddings`` of shape [N, L * 2 * H_kv * D] whose last axis
is laid out [L0.key, L0.value, L1.key, ...], each chunk head-major. With ``prefix_projection`` the
vectors are produced during training by an MLP (embedding [N, hidden] -> Linear -> tanh ->
Linear), the reparameterisation the paper found more stable; ``inference_state_dict`` folds it
away and saves only the produced vectors. Real tokens are placed at positions N.. as in peft.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.arch import Arch
from align.rules import AT_LEAST_ONE


@register
class PrefixTuning(AdapterSet):
    method = "prefix"
    merge_refusal = ("adds learned key/value vectors to every attention layer, which are not weights of the "
                     "backbone; use --format peft (PREFIX_TUNING)")
    peft_type = "PREFIX_TUNING"
    settings = {"num_virtual_tokens": AT_LEAST_ONE, "prefix_projection": None, "encoder_hidden_size": AT_LEAST_ONE}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        n = config.num_virtual_tokens
        self.out_dim = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim
        if config.prefix_projection:
            self.embedding = nn.Embedding(n, arch.hidden_size)
            self.transform = nn.Sequential(
                nn.Linear(arch.hidden_size, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, self.out_dim))
        else:
            self.embedding = nn.Embedding(n, self.out_dim)
            self.transform = None

    def prompt_embeddings(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def layer_kv(self, emb: torch.Tensor, layer_idx: int, batch_size: int):
        a = self.arch
        x = emb.view(emb.shape[0], a.num_layers * 2, a.num_kv_heads, a.head_dim)
        k = x[:, 2 * layer_idx].transpose(0, 1)       # [H_kv, N, D]
        v = x[:, 2 * layer_idx + 1].transpose(0, 1)
        return k.unsqueeze(0).expand(batch_size, -1, -1, -1), v.unsqueeze(0).expand(batch_size, -1, -1, -1)

    def attention_extra(self, layer_idx: int, batch_size: int):
        return self.layer_kv(self.prompt_embeddings(), layer_idx, batch_size)

    def num_prefix_positions(self) -> int:
        return self.config.num_virtual_tokens

    def expected_num_params(self) -> int:
        n, c = self.config.num_virtual_tokens, self.config
        if c.prefix_projection:
            h, e = self.arch.hidden_size, c.encoder_hidden_size
            return n * h + (h * e + e) + (e * self.out_dim + self.out_dim)
        return n * self.out_dim

    def inference_state_dict(self):
        return {"prompt_embeddings": self.prompt_embeddings().detach()}

    # --- HF peft layout: one tensor prompt_embeddings [N, L*2*H_kv*D] -------------------------
    def peft_config(self) -> dict:
        a = self.arch
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": self.config.num_virtual_tokens, "num_layers": a.num_layers,
                "token_dim": a.num_kv_heads * a.head_dim, "num_attention_heads": a.num_kv_heads,
                "num_transformer_submodules": 1, "prefix_projection": False, "inference_mode": True}

    def saved_config(self) -> AdapterConfig:
        return dataclasses.replace(self.config, prefix_projection=False)

    def import_state_dict(self, sd):
        if self.transform is not None:
            raise ValueError("load a saved prefix into a set without prefix_projection (it is folded)")
        with torch.no_grad():
            self.embedding.weight.copy_(sd["prompt_embeddings"])

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        return AdapterConfig(method="prefix", num_virtual_tokens=p["num_virtual_tokens"],
                             prefix_projection=False)
