"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations elementwise.

``softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)`` and ``(l_ff * act(W1 x)) W2``: the outputs of the
key and value projections are multiplied by ``l_k`` / ``l_v`` ("out" hooks) and the input of the
MLP's down projection by ``l_ff`` ("in" hook). Every vector starts at one, so a fresh set is the
identity.

Targets follow peft: ``target_modules`` (suffix list or full-match regex) picks Linear/Conv1D
layers; those also matched by ``feedforward_modules`` (peft's rule: a regex full match, or a plain
``endswith`` per list entry) scale their *input*, the others their *output*. Defaults per family:
llama-like ``[k_proj, v_proj, down_proj]`` with ``[down_proj]`` feed-forward (peft's default for
llama/mistral; peft's own qwen2 default scales q_proj instead of k_proj, pass ``target_modules``
to get that); gpt2 ``[c_attn, mlp.c_proj]`` with ``[mlp.c_proj]``.

Fused q|k|v layers (gpt2's ``c_attn``, phi3's ``qkv_proj``, GPT-NeoX's ``query_key_value``):
only the rows producing keys and values are trainable here (the paper's ``l_k``, ``l_v``, one
vector ``[l_k; l_v]``); the query rows' scale is a buffer of ones. Which rows those are comes from
``Arch.qkv_rows``: gpt2's thirds, phi3's ``[H*D | H_kv*D | H_kv*D]`` (grouped-query k/v), GPT-NeoX's
per-head interleaving ``[H, 3, D]``. peft scales the whole fused output with one ``[rows, 1]``
vector, so export writes the full vector (ones on the query rows) and import puts a peft vector's
query rows into the buffer, which keeps round trips exact. Defaults: phi3 ``[qkv_proj,
down_proj]`` with ``[down_proj]`` (peft has none for phi3); gpt_neox peft's ``[query_key_value,
dense_4h_to_h]`` with ``[dense_4h_to_h]``.

peft layout: ``base_model.model.<path>.ia3_l``, shape ``[out, 1]`` (output scaling) or
``[1, in]`` (feed-forward, input scaling).
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, match_target, register
from align.adapters.lora import key
from align.arch import Arch, is_linear, linear_shape

DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
                   "phi3": ["qkv_proj", "down_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"]}
DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "phi3": ["down_proj"],
                       "gpt_neox": ["dense_4h_to_h"]}


def is_feedforward(name: str, ff) -> bool:
    """peft's ``_check_target_module_feedforward``."""
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff)


@register
class IA3(AdapterSet):
    method = "ia3"
    merge_refusal = None   # its vectors scale weight rows or columns
    peft_type = "IA3"
    settings = {"target_modules": None, "feedforward_modules": None}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        self.targets = config.target_modules or DEFAULT_TARGETS[arch.family]
        # as in peft, the family default applies whenever none is given (only targets are checked)
        self.feedforward = config.feedforward_modules
        if self.feedforward is None:
            self.feedforward = DEFAULT_FEEDFORWARD[arch.family]
        fused = set()
        if arch.fused_qkv:  # gpt2, phi3, gpt_neox: q, k, v from one layer
            fused = {f"{arch.attn_path(i)}.{arch.k_proj}" for i in range(arch.num_layers)}
            q_rows, k_rows, v_rows = arch.qkv_rows()
            # the layer's rows of the q buffer and of the trainable [l_k; l_v]; ``qkv_order`` puts
            # [q buffer; l_k; l_v] into the layer's row order (the identity for stacked layouts)
            rows = torch.cat([q_rows, k_rows, v_rows])
            order = torch.empty_like(rows)
            order[rows] = torch.arange(rows.numel())
            self.register_buffer("q_rows", q_rows, persistent=False)
            self.register_buffer("kv_rows", torch.cat([k_rows, v_rows]), persistent=False)
            self.register_buffer("qkv_order", order, persistent=False)
        self.paths: list[str] = []
        self.kind: dict[str, str] = {}   # path -> "ff" | "out" | "kv" (fused q|k|v, scale k, v)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.vectors = nn.ParameterDict()
        for path, module in backbone.named_modules():
            if not (path and is_linear(module) and match_target(path, self.targets)):
                continue
            fin, fout = linear_shape(module)
            if is_feedforward(path, self.feedforward):
                kind, n = "ff", fin
            elif path in fused:
                if fout != self.q_rows.numel() + self.kv_rows.numel():
                    raise ValueError(f"{path}: fused qkv output {fout} is not {self.q_rows.numel()} query "
                                     f"+ {self.kv_rows.numel()} key/value rows")
                kind, n = "kv", self.kv_rows.numel()
                self.register_buffer(f"q_scale__{key(path)}", torch.ones(self.q_rows.numel()))
            else:
                kind, n = "out", fout
            self.vectors[key(path)] = nn.Parameter(torch.ones(n))
            self.paths.append(path)
            self.kind[path] = kind
            self.shapes[path] = (fin, fout)
        if not self.paths:
            raise ValueError(f"IA3 target_modules={self.targets!r} matched no Linear layer of the backbone")

    def scale(self, path: str) -> torch.Tensor:
        """The full vector applied at ``path`` (for fused qkv: the q buffer on the query rows,
        ``[l_k; l_v]`` on the key and value rows, in the layer's own row order)."""
        v = self.vectors[key(path)]
        if self.kind[path] == "kv":
            v = torch.cat([getattr(self, f"q_scale__{key(path)}").to(v.dtype), v])
            if self.arch.qkv_layout != "stacked":
                v = v.index_select(0, self.qkv_order)
        return v

    def hook_points(self):
        return {(p, "in" if self.kind[p] == "ff" else "out"): self._make_hook(p) for p in self.paths}

    def _make_hook(self, path: str):
        if self.kind[path] == "ff":
            return lambda x: (x * self.scale(path).to(x.dtype))
        return lambda x, out: (out * self.scale(path).to(out.dtype))

    def expected_num_params(self) -> int:
        total = 0
        for p in self.paths:
            fin, fout = self.shapes[p]
            total += {"ff": fin, "out": fout, "kv": 2 * self.arch.num_kv_heads * self.arch.head_dim}[self.kind[p]]
        return total

    # --- HF peft layout: base_model.model.<path>.ia3_l -----------------------------------------
    def peft_config(self) -> dict:
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": self.targets,
                "feedforward_modules": self.feedforward, "fan_in_fan_out": self.arch.conv1d,
                "init_ia3_weights": True, "inference_mode": True}

    def saved_config(self) -> AdapterConfig:
        return dataclasses.replace(self.config, target_modules=self.targets,
                                   feedforward_modules=self.feedforward)

    def export_state_dict(self):
        out = {}
        for p in self.paths:
            v = self.scale(p).detach()
            out[f"base_model.model.{p}.ia3_l"] = v[None] if self.kind[p] == "ff" else v[:, None]
        return out

    def import_state_dict(self, sd):
        expected = {f"base_model.model.{p}.ia3_l" for p in self.paths}
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd))[:3], sorted(set(sd) - expected)[:3]
            raise ValueError(f"IA3 tensors do not match the backbone's target layers: "
                             f"missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for p in self.paths:
                v = sd[f"base_model.model.{p}.ia3_l"].flatten()
                if self.kind[p] == "kv":
                    getattr(self, f"q_scale__{key(p)}").copy_(v[self.q_rows.to(v.device)])
                    v = v[self.kv_rows.to(v.device)]
                self.vectors[key(p)].copy_(v)

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        if p.get("modules_to_save"):
            raise ValueError("IA3 adapters with modules_to_save cannot be imported")
        return AdapterConfig(method="ia3", target_modules=p["target_modules"],
                             feedforward_modules=p.get("feedforward_modules") or [])
