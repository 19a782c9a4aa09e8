"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens made by a prompt encoder.

N trainable input vectors (``nn.Embedding``, or any ``prompt_init`` of prompt tuning) pass
through a prompt encoder during training, and its output is prepended to the input embeddings
exactly like a soft prompt. Encoders, as in peft (``encoder_type``):

* ``mlp``: ``Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d)`` (peft always uses these
  three layers);
* ``lstm``: a bidirectional ``LSTM(d, h, num_layers)`` then ``Linear(2h, 2h) - ReLU -
  Linear(2h, d)`` (peft's layout, which differs from the paper code's h/2 per direction).
  ``extra: {encoder_num_layers: 2, encoder_dropout: 0.0}`` are peft's LSTM defaults;
* ``none``: no encoder, the vectors are used directly. This is what a saved set is: for
  inference and export the encoder output is folded into ``prompt_embeddings`` [N, hidden]
  (peft's layout; peft drops the encoder on save too), so training cannot resume the encoder
  from a saved set; it continues as plain prompt vectors.

h is ``encoder_hidden_size``; d is the backbone's hidden size.

Anchor tokens. The paper's template ``{[P_0:i], x, [P_i+1:m], y}`` interleaves virtual tokens
with text and keeps task-related "anchor" tokens (e.g. ``?``, ``Answer:``) as real words. Here,
as in peft, all virtual tokens go in front of the input, and anchors are ordinary text of the
prompt: put them in the data, e.g. write prompts as ``"Question: {x} Answer:"`` when preparing
the records, or give ``data.chat_template`` a Jinja template that renders the user turn as
``Question: {{ content }} Answer:``. They are tokenized and embedded by the frozen embedding
like any other prompt text; nothing in the adapter needs to know about them.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.adapters.prompt import PROMPT_INITS, PromptTuning
from align.arch import Arch
from align.rules import AT_LEAST_ONE, OneOf

ENCODERS = ("mlp", "lstm", "none")
PEFT_ENCODER = {"mlp": "MLP", "lstm": "LSTM", "none": "MLP"}


@register
class PTuning(PromptTuning):
    method = "ptuning"
    merge_refusal = ("prepends virtual tokens made by its prompt encoder, which no backbone weight can "
                     "express; use --format peft (P_TUNING)")
    peft_type = "P_TUNING"
    settings = {"num_virtual_tokens": AT_LEAST_ONE, "encoder_type": OneOf(*ENCODERS),
                "encoder_hidden_size": AT_LEAST_ONE, "prompt_init": OneOf(*PROMPT_INITS), "prompt_init_text": None}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        AdapterSet.__init__(self, name, config, arch)
        if config.encoder_type not in ENCODERS:
            raise ValueError(f"adapter.encoder_type={config.encoder_type!r}: choose from {ENCODERS}")
        d, h = arch.hidden_size, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self._init_from_vocab(config, backbone)
        self.lstm = None
        self.mlp = None
        if config.encoder_type == "mlp":
            self.mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        elif config.encoder_type == "lstm":
            self.lstm = nn.LSTM(d, h, num_layers=self.lstm_layers, dropout=config.extra.get("encoder_dropout", 0.0),
                                bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))

    @property
    def lstm_layers(self) -> int:
        return int(self.config.extra.get("encoder_num_layers", 2))

    def prompts(self) -> torch.Tensor:
        w = self.embedding.weight
        if self.lstm is not None:
            return self.mlp(self.lstm(w[None])[0])[0]
        if self.mlp is not None:
            return self.mlp(w)
        return w

    def expected_num_params(self) -> int:
        c, d, h = self.config, self.arch.hidden_size, self.config.encoder_hidden_size
        n = c.num_virtual_tokens * d
        if c.encoder_type == "mlp":
            n += (d * h + h) + (h * h + h) + (h * d + d)
        elif c.encoder_type == "lstm":
            for layer in range(self.lstm_layers):
                fin = d if layer == 0 else 2 * h
                n += 2 * (4 * h * fin + 4 * h * h + 8 * h)       # two directions, two biases
            n += (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
        return n

    # --- HF peft layout: prompt_embeddings = the encoder's output [N, hidden] ----------------
    def peft_config(self) -> dict:
        return {"peft_type": "P_TUNING", **self._peft_common(),
                "encoder_reparameterization_type": PEFT_ENCODER[self.config.encoder_type],
                "encoder_hidden_size": self.config.encoder_hidden_size}

    def saved_config(self) -> AdapterConfig:
        return dataclasses.replace(self.config, encoder_type="none", prompt_init="random")

    def import_state_dict(self, sd):
        if self.mlp is not None:
            raise ValueError("load saved p-tuning prompts into a set with encoder_type: none "
                             "(the encoder is folded into prompt_embeddings on save)")
        super().import_state_dict(sd)

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        cls._check_peft(p)
        return AdapterConfig(method="ptuning", num_virtual_tokens=p["num_virtual_tokens"],
                             encoder_type="none", encoder_hidden_size=p.get("encoder_hidden_size") or 64)
