"""Where things live inside a Hugging Face causal LM, per model family.

Adapters attach by module path; this file is the one place that knows the paths of the
decoder blocks, their attention and MLP sub-modules, and the shapes the methods need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    family: str              # llama-like ("llama", "qwen2", "mistral") or "gpt2"
    model_type: str
    layers_path: str         # e.g. "model.layers" / "transformer.h"
    attn_name: str           # attribute of a block: "self_attn" / "attn"
    mlp_name: str            # "mlp"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    k_proj: str              # module name (inside attn) producing keys; gpt2 fuses q,k,v
    v_proj: str
    mlp_down: str            # module name (inside mlp) whose input is the intermediate activation
    conv1d: bool             # gpt2's Conv1D stores weights as [in, out]

    def block_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def attn_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.attn_name}"

    def mlp_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.mlp_name}"


LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral", "gemma", "olmo", "olmo2"}
# Families align cannot serve yet, with the reason given at load (never a silent mis-mapping).
REFUSED = {
    "phi3": "Phi-3 fuses q/k/v into one qkv_proj and gate/up into gate_up_proj; align's IA3, "
            "LLaMA-Adapter and prefix methods address k_proj/v_proj/down_proj of Llama-style blocks",
    "gemma2": "Gemma-2 soft-caps attention logits and alternates sliding/global layers with its own "
              "mask rules, which align's attention function does not reproduce",
    "gemma3": "Gemma-3 soft-caps attention logits and alternates sliding/global layers with its own "
              "mask rules, which align's attention function does not reproduce",
}


class UnsupportedArchitecture(ValueError):
    pass


def detect_arch(model: nn.Module) -> Arch:
    cfg = model.config
    mt = cfg.model_type
    if mt in REFUSED:
        raise UnsupportedArchitecture(f"model_type {mt!r} is refused: {REFUSED[mt]}. "
                                      f"Supported: {sorted(LLAMA_LIKE | {'gpt2'})}")
    if mt in LLAMA_LIKE:
        for name in ("qkv_proj", "gate_up_proj"):
            if any(n.endswith("." + name) for n, _ in model.named_modules()):
                raise UnsupportedArchitecture(
                    f"model_type {mt!r} has fused {name} layers, which align does not map; "
                    f"IA3, LLaMA-Adapter and prefix methods need separate k_proj/v_proj/down_proj")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return Arch("llama", mt, "model.layers", "self_attn", "mlp", cfg.num_hidden_layers,
                    cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim, cfg.intermediate_size, "k_proj", "v_proj", "down_proj", False)
    if mt == "gpt2":
        return Arch("gpt2", mt, "transformer.h", "attn", "mlp", cfg.n_layer, cfg.n_embd,
                    cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head,
                    cfg.n_inner or 4 * cfg.n_embd, "c_attn", "c_attn", "c_proj", True)
    raise UnsupportedArchitecture(
        f"model_type {mt!r} is not supported yet; supported: {sorted(LLAMA_LIKE | {'gpt2'})} "
        f"(see docs/checkpoints.md, 'Supported architectures')")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (bitsandbytes' Linear4bit / Linear8bitLt included:
    their packed weight's shape is not the layer's) or a transformers Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = getattr(module, "weight", None)
    if w is not None and type(module).__name__ == "Conv1D":
        return w.shape[0], w.shape[1]
    raise TypeError(f"{type(module).__name__} is not a Linear/Conv1D layer")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# model.quantization: how the frozen backbone's Linear weights are stored (align.backbone loads them)
QUANTIZATIONS = ("none", "int8", "nf4")


def quantization_of(backbone: nn.Module) -> str:
    """``none``, ``int8`` or ``nf4``: how the loaded backbone's Linear weights are stored."""
    q = getattr(backbone, "_align_quantization", None)
    if q is not None:
        return q
    if getattr(backbone, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(backbone, "is_loaded_in_8bit", False):
        return "int8"
    return "none"


def quantized_refusal(method: str, quantization: str) -> str:
    return (f"adapter method {method!r} trains backbone weights, which are frozen {quantization} "
            f"integers on a quantized backbone (model.quantization={quantization}); use a "
            f"parameter-efficient method (lora, bottleneck, prefix, ia3, prompt, ptuning, "
            f"llama_adapter) or model.quantization=none")


def refuse_quantized(method: str, backbone: nn.Module) -> None:
    """A method that trains backbone weights (``AdapterSet.trains_backbone``: the ``full`` /
    ``top_k`` baselines) is refused on an int8 / nf4 backbone."""
    q = quantization_of(backbone)
    if q != "none":
        raise ValueError(quantized_refusal(method, q))


def compute_dtype(module: nn.Module, fallback):
    """The dtype a Linear layer computes in: its weight's, or for a bitsandbytes layer (integer
    storage) its ``compute_dtype`` when set, else ``fallback`` (the activations' dtype)."""
    w = getattr(module, "weight", None)
    if w is not None and w.is_floating_point():
        return w.dtype
    return getattr(module, "compute_dtype", None) or fallback
