"""LoRA (Hu et al. 2022): ``h = W0 x + (alpha / r) * B A x`` on selected Linear layers.

A is initialised like peft (kaiming-uniform, a=sqrt(5)), B is zero, so a fresh set is the
identity. The delta is added by a forward hook on the frozen layer; ``merged_delta`` gives
``(alpha/r) B A`` in the layer's own weight layout for export.

On a quantized backbone (``model.quantization``) the targets are bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` layers (``nn.Linear`` subclasses with the logical in/out features), as in QLoRA:
their output is in the compute dtype, the branch runs in the adapter's dtype and is added in the
output's, exactly as peft's bitsandbytes LoRA layers do (tests/test_quantization.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, match_target, register
from align.arch import Arch, is_linear, linear_shape
from align.rules import AT_LEAST_ONE, POSITIVE, Range

# phi3 / gpt_neox: one LoRA on the fused q|k|v layer, as peft puts it (peft's gpt_neox default;
# peft has no phi3 default and asks for target_modules)
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "phi3": ["qkv_proj"],
                   "gpt_neox": ["query_key_value"]}


def key(path: str) -> str:
    """Module paths contain dots, which ModuleDict keys may not."""
    return path.replace(".", "__")


class LoraPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


@register
class LoRA(AdapterSet):
    method = "lora"
    merge_refusal = None   # the low-rank product B·A is a weight update
    peft_type = "LORA"
    settings = {"r": AT_LEAST_ONE, "alpha": POSITIVE, "dropout": Range(0, 1, hi_open=True),
                "target_modules": None, "use_rslora": None}

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        targets = config.target_modules or DEFAULT_TARGETS[arch.family]
        self.targets = targets
        self.scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.paths: list[str] = []
        self.pairs = nn.ModuleDict()
        for path, module in backbone.named_modules():
            if path and is_linear(module) and match_target(path, targets):
                fin, fout = linear_shape(module)
                self.pairs[key(path)] = LoraPair(fin, fout, config.r)
                self.paths.append(path)
        if not self.paths:
            raise ValueError(f"LoRA target_modules={targets!r} matched no Linear layer of the backbone")
        self.shapes = {p: linear_shape(m) for p, m in backbone.named_modules() if p in self.paths}

    def hook_points(self):
        return {(path, "out"): self._make_hook(path) for path in self.paths}

    def _make_hook(self, path: str):
        pair = self.pairs[key(path)]

        def add_delta(x, out):
            x = self.dropout(x.to(pair.lora_A.weight.dtype))
            return out + (pair.lora_B(pair.lora_A(x)) * self.scaling).to(out.dtype)
        return add_delta

    def expected_num_params(self) -> int:
        r = self.config.r
        return sum(r * (fin + fout) for fin, fout in self.shapes.values())

    def merged_delta(self, path: str, conv1d: bool = False) -> torch.Tensor:
        """``scaling * B @ A`` as [out, in] (nn.Linear) or [in, out] (Conv1D)."""
        pair = self.pairs[key(path)]
        delta = (pair.lora_B.weight @ pair.lora_A.weight) * self.scaling
        return delta.T if conv1d else delta

    # --- HF peft layout: base_model.model.<path>.lora_{A,B}.weight ------------------------
    def peft_config(self) -> dict:
        c = self.config
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.alpha,
                "lora_dropout": c.dropout, "target_modules": self.targets, "bias": "none",
                "fan_in_fan_out": self.arch.conv1d, "use_rslora": c.use_rslora,
                "inference_mode": True}

    def export_state_dict(self):
        out = {}
        for path in self.paths:
            pair = self.pairs[key(path)]
            out[f"base_model.model.{path}.lora_A.weight"] = pair.lora_A.weight.detach()
            out[f"base_model.model.{path}.lora_B.weight"] = pair.lora_B.weight.detach()
        return out

    def import_state_dict(self, sd):
        expected = set(self.export_state_dict())
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd))[:3], sorted(set(sd) - expected)[:3]
            raise ValueError(f"LoRA tensors do not match the backbone's target layers: "
                             f"missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for path in self.paths:
                pair = self.pairs[key(path)]
                pair.lora_A.weight.copy_(sd[f"base_model.model.{path}.lora_A.weight"])
                pair.lora_B.weight.copy_(sd[f"base_model.model.{path}.lora_B.weight"])

    @classmethod
    def config_from_peft(cls, p: dict) -> AdapterConfig:
        if p.get("use_dora") or p.get("bias", "none") != "none" or p.get("modules_to_save"):
            raise ValueError("only plain LoRA adapters (no DoRA, bias or modules_to_save) can be imported")
        return AdapterConfig(method="lora", r=p["r"], alpha=p["lora_alpha"],
                             dropout=p.get("lora_dropout", 0.0), target_modules=p["target_modules"],
                             use_rslora=p.get("use_rslora", False))
