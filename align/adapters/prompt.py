"""Prompt tuning (Lester et al. 2021): a soft prompt of N trainable vectors in front of the input.

``[P; X_e]``: the N x hidden prompt ``P`` is prepended to the token embeddings at prefill
(``virtual_embeddings``; ``AlignModel`` adds it once and never returns its positions). The real
tokens sit at positions N.. as in peft. Initialisation (``prompt_init``), as peft does it:

* ``random``: ``nn.Embedding``'s default N(0, 1) (peft's RANDOM; the paper's uniform [-0.5, 0.5]
  is not what peft uses);
* ``sample_vocab``: the backbone's embeddings of N token ids drawn uniformly from the vocabulary;
* ``text``: the embeddings of ``prompt_init_text`` tokenized by the backbone's tokenizer
  (``extra: {tokenizer: path}`` or the backbone's ``name_or_path``), repeated / truncated to N.

peft layout: one tensor ``prompt_embeddings`` [N, hidden]. peft's causal-LM forward returns
logits for the N virtual positions too; ours are only the real positions.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.arch import Arch
from align.rules import AT_LEAST_ONE, OneOf

PROMPT_INITS = ("random", "sample_vocab", "text")


def text_init_ids(text: str, n: int, tokenizer_path: str) -> torch.Tensor:
    """peft's TEXT init: the tokenized text, truncated, or repeated then truncated, to ``n`` ids."""
    from transformers import AutoTokenizer
    if not text:
        raise ValueError("prompt_init: text needs a non-empty prompt_init_text")
    if not tokenizer_path:
        raise ValueError("prompt_init: text needs a tokenizer: set adapter.extra.tokenizer "
                         "(the backbone records no name_or_path)")
    ids = AutoTokenizer.from_pretrained(str(tokenizer_path))(text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_init_text {text!r} tokenizes to nothing")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return torch.tensor(ids, dtype=torch.long)


@register
class PromptTuning(AdapterSet):
    method = "prompt"
    merge_refusal = ("prepends learned embeddings to every input, which no backbone weight can express; "
                     "use --format peft (PROMPT_TUNING)")
    peft_type = "PROMPT_TUNING"
    settings = {"num_virtual_tokens": AT_LEAST_ONE, "prompt_init": OneOf(*PROMPT_INITS), "prompt_init_text": None}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        n = config.num_virtual_tokens
        if n < 1:
            raise ValueError("num_virtual_tokens must be >= 1")
        self.embedding = nn.Embedding(n, arch.hidden_size)
        self._init_from_vocab(config, backbone)

    def _init_from_vocab(self, config: AdapterConfig, backbone: nn.Module) -> None:
        n, init = config.num_virtual_tokens, config.prompt_init
        embed = backbone.get_input_embeddings()
        if init == "random":
            return
        if init == "sample_vocab":
            ids = torch.randint(0, embed.num_embeddings, (n,))
        elif init == "text":
            path = config.extra.get("tokenizer") or getattr(backbone, "name_or_path", "")
            ids = text_init_ids(config.prompt_init_text, n, path)
        else:
            raise ValueError(f"adapter.prompt_init={init!r}: choose random, sample_vocab or text")
        with torch.no_grad():
            self.embedding.weight.copy_(embed(ids.to(embed.weight.device)).float())

    def prompts(self) -> torch.Tensor:
        """[N, hidden], the vectors placed in front of the input."""
        return self.embedding.weight

    def virtual_embeddings(self, batch_size: int, embed: nn.Embedding) -> torch.Tensor:
        p = self.prompts()
        return p[None].expand(batch_size, -1, -1)

    def expected_num_params(self) -> int:
        return self.config.num_virtual_tokens * self.arch.hidden_size

    def inference_state_dict(self):
        return {"prompt_embeddings": self.prompts().detach()}

    # --- HF peft layout: one tensor prompt_embeddings [N, hidden] --------------------------
    def _peft_common(self) -> dict:
        a = self.arch
        return {"task_type": "CAUSAL_LM", "num_virtual_tokens": self.config.num_virtual_tokens,
                "token_dim": a.hidden_size, "num_transformer_submodules": 1,
                "num_attention_heads": a.num_heads, "num_layers": a.num_layers, "inference_mode": True}

    def peft_config(self) -> dict:
        # the init is irrelevant once trained (and peft skips it in inference mode)
        return {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", **self._peft_common()}

    def saved_config(self) -> AdapterConfig:
        return dataclasses.replace(self.config, prompt_init="random")

    def import_state_dict(self, sd):
        if set(sd) != {"prompt_embeddings"}:
            raise ValueError(f"expected one tensor 'prompt_embeddings', got {sorted(sd)[:3]}")
        w = sd["prompt_embeddings"]
        if tuple(w.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(f"prompt_embeddings has shape {tuple(w.shape)}, expected "
                             f"{tuple(self.embedding.weight.shape)} (num_virtual_tokens x hidden)")
        with torch.no_grad():
            self.embedding.weight.copy_(w)

    @staticmethod
    def _check_peft(p: dict) -> None:
        if p.get("num_transformer_submodules", 1) not in (None, 1):
            raise ValueError("only decoder-only (num_transformer_submodules=1) prompts can be imported")

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        cls._check_peft(p)
        return AdapterConfig(method="prompt", num_virtual_tokens=p["num_virtual_tokens"])
