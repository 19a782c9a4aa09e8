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


LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "olmo", "olmo2"}
# Families align cannot serve yet, with the reason given at load (never a silent mis-mapping).
REFUSED = {
    "phi3": "Phi-3 fuses q/k/v into one qkv_proj and gate/up into gate_up_proj; align's IA3, "
            "LLaMA-Adapter and prefix methods address k_proj/v_proj/down_proj of Llama-style blocks",
    "gemma2": "Gemma-2 soft-caps attention logits in every layer (sdpa, align's default attention, cannot "
              "apply that) and align does not test it",
    "gemma3": "this is the multimodal Gemma-3 model (Gemma3ForConditionalGeneration); align serves its "
              "language model alone: load the checkpoint with align.backbone.load_backbone (every stage "
              "does), which loads the text part as transformers' Gemma3ForCausalLM (images are not supported)",
}
# Multimodal checkpoints whose language model align loads alone, with transformers' own text class:
# model_type -> (class name, key renames for ``from_pretrained(key_mapping=...)``, prefixes of the
# checkpoint keys left out). Both layouts a Gemma-3 checkpoint may have are renamed: the original
# ``language_model.model.*`` and transformers 4.5x's ``model.language_model.*``.
TEXT_PARTS = {
    "gemma3": ("Gemma3ForCausalLM",
               {r"^language_model\.model\.": "model.", r"^model\.language_model\.": "model.",
                r"^language_model\.lm_head\.": "lm_head."},
               ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")),
}


def config_refusal(cfg) -> str | None:
    """Why align refuses a config of a supported family (None when it does not): a setting that
    transformers' model code or align's attention would silently not apply."""
    if cfg.model_type == "gemma3_text":
        cap = getattr(cfg, "attn_logit_softcapping", None)
        if cap is not None:
            return (f"the config sets attn_logit_softcapping={cap}, but transformers' Gemma-3 attention does not "
                    f"apply it (Gemma-3 replaced Gemma-2's soft-capping with QK-norm), so the checkpoint would "
                    f"run without it; set it to null if the checkpoint was trained without soft-capping")
        if getattr(cfg, "use_bidirectional_attention", False):
            return ("the config sets use_bidirectional_attention=true (an encoder such as EmbeddingGemma), "
                    "not a causal LM; align's attention masks are causal")
    return None


# model.attn_implementation: the transformers attention function align's own (align.attention)
# delegates the core attention to, after adding prefix key/values and before LLaMA-Adapter's output
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def attn_implementation_problem(name) -> str | None:
    """What is wrong with ``model.attn_implementation=name`` (None: nothing)."""
    if name in ("sdpa", "eager"):
        return None
    if name == "flex_attention":
        import importlib.util
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "needs torch.nn.attention.flex_attention (torch >= 2.5), which this torch lacks; use sdpa or eager"
        return None
    if isinstance(name, str) and name.startswith("flash_attention"):
        import importlib.util
        missing = "" if importlib.util.find_spec("flash_attn") is not None else \
            " (and the flash_attn package is not installed)"
        return (f"not supported{missing}: align hands attention a 4-D mask (left padding, packed segments, "
                f"virtual tokens, prefix key/values, sliding windows), and flash-attention kernels take only "
                f"a 2-D padding mask and a causal flag; use sdpa (its own kernels), eager or flex_attention")
    return "choose one of " + ", ".join(ATTN_IMPLEMENTATIONS)


class UnsupportedArchitecture(ValueError):
    pass


def detect_arch(model: nn.Module) -> Arch:
    cfg = model.config
    mt = cfg.model_type
    if mt in REFUSED:
        raise UnsupportedArchitecture(f"model_type {mt!r} is refused: {REFUSED[mt]}. "
                                      f"Supported: {sorted(LLAMA_LIKE | {'gpt2'})}")
    if mt in LLAMA_LIKE:
        if (why := config_refusal(cfg)) is not None:
            raise UnsupportedArchitecture(f"model_type {mt!r}: {why}")
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
