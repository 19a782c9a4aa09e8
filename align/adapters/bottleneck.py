"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

``h <- h + W_up f(W_down h)`` applied to a sub-layer's output before the residual add: after the
attention block and after the MLP (Houlsby) or after the MLP only (Pfeiffer). W_down is drawn
from N(0, init_std) truncated at 2 sigma; W_up and both biases start at zero, so a fresh set is
the identity (docs/invariants.md #3). HF peft has no bottleneck tuner, so these save in align's own
format only.
"""
from __future__ import annotations

import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.adapters.lora import key
from align.arch import Arch
from align.rules import AT_LEAST_ONE, NON_NEGATIVE, OneOf

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int, nonlinearity: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(m, d)
        nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


@register
class BottleneckAdapter(AdapterSet):
    method = "bottleneck"
    merge_refusal = ("adds a small nonlinear network (down-projection, activation, up-projection) after "
                     "its blocks, which no backbone weight can express; HF peft has no bottleneck method "
                     "either: run it with align (align generate RUN_DIR)")
    settings = {"variant": OneOf("houlsby", "pfeiffer"), "bottleneck_size": AT_LEAST_ONE,
                "nonlinearity": OneOf(*ACTIVATIONS), "init_std": NON_NEGATIVE}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        if config.variant not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter.variant={config.variant!r}: choose houlsby or pfeiffer")
        if config.nonlinearity not in ACTIVATIONS:
            raise ValueError(f"adapter.nonlinearity={config.nonlinearity!r}: choose from {sorted(ACTIVATIONS)}")
        self.paths = []
        for i in range(arch.num_layers):
            if config.variant == "houlsby":
                self.paths.append(arch.attn_path(i))
            self.paths.append(arch.mlp_path(i))
        self.blocks = nn.ModuleDict({
            key(p): Bottleneck(arch.hidden_size, config.bottleneck_size, config.nonlinearity, config.init_std)
            for p in self.paths})

    def hook_points(self):
        return {(p, "out"): self._make_hook(p) for p in self.paths}

    def _make_hook(self, path):
        block = self.blocks[key(path)]
        return lambda x, out: block(out)

    def expected_num_params(self) -> int:
        d, m = self.arch.hidden_size, self.config.bottleneck_size
        return len(self.paths) * (2 * m * d + m + d)
