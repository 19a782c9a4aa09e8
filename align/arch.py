"""Where things live inside a Hugging Face causal LM, per model family.

Adapters attach by module path; this file is the one place that knows the paths of the
decoder blocks, their attention and MLP sub-modules, and the shapes the methods need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    family: str              # llama-like ("llama", "qwen2", "mistral"), "gpt2", "phi3" or "gpt_neox"
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
    k_proj: str              # module name (inside attn) producing keys; gpt2/phi3/gpt_neox fuse q,k,v
    v_proj: str              # (k_proj == v_proj: one fused layer, laid out as ``qkv_layout`` says)
    mlp_down: str            # module name (inside mlp) whose input is the intermediate activation
    conv1d: bool             # gpt2's Conv1D stores weights as [in, out]
    # rows of a fused q|k|v layer's output: "stacked" [q; k; v] (gpt2's thirds, phi3's
    # [H*D; H_kv*D; H_kv*D]) or "interleaved" per head [q_h; k_h; v_h] (GPT-NeoX's [H, 3, D])
    qkv_layout: str = "stacked"

    def block_path(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def attn_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.attn_name}"

    def mlp_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.mlp_name}"

    @property
    def fused_qkv(self) -> bool:
        """One layer produces queries, keys and values (gpt2's c_attn, phi3's qkv_proj, GPT-NeoX's
        query_key_value)."""
        return self.k_proj == self.v_proj

    def qkv_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of the q, k and v rows in a fused q|k|v layer's output, each head-major (the
        order the model's own ``view(..., heads, head_dim)`` reads them in)."""
        q_n, kv_n, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        if self.qkv_layout == "stacked":
            return (torch.arange(q_n), torch.arange(q_n, q_n + kv_n), torch.arange(q_n + kv_n, q_n + 2 * kv_n))
        if self.qkv_layout == "interleaved":  # [H, 3, D]: needs H == H_kv (GPT-NeoX has no GQA)
            rows = torch.arange(3 * q_n).view(self.num_heads, 3, d)
            return rows[:, 0].flatten(), rows[:, 1].flatten(), rows[:, 2].flatten()
        raise ValueError(f"unknown qkv_layout {self.qkv_layout!r}")

    def split_qkv(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fused q|k|v output ``t`` [..., rows] -> (q [..., H*D], k [..., H_kv*D], v [..., H_kv*D]),
        each head-major."""
        q_n, kv_n = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_layout == "stacked":
            return t.split([q_n, kv_n, kv_n], dim=-1)
        x = t.unflatten(-1, (self.num_heads, 3, self.head_dim))
        return x[..., 0, :].flatten(-2), x[..., 1, :].flatten(-2), x[..., 2, :].flatten(-2)


LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "olmo", "olmo2"}
# Families whose attention fuses q, k and v into one layer, mapped by ``fused_arch``
FUSED = {"phi3", "gpt_neox"}
# Families align cannot serve yet, with the reason given at load (never a silent mis-mapping).
REFUSED = {
    "bloom": "BLOOM fuses q/k/v into query_key_value and adds ALiBi position biases in its own attention "
             "code, which does not go through transformers' attention interface that align's prefix "
             "tuning and LLaMA-Adapter act in",
    "mpt": "MPT fuses q/k/v into Wqkv and adds ALiBi position biases in its own attention code, which "
           "does not go through transformers' attention interface that align's prefix tuning and "
           "LLaMA-Adapter act in",
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
                                      f"Supported: {sorted(LLAMA_LIKE | {'gpt2'} | FUSED)}")
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
    if mt in FUSED:
        return fused_arch(model)
    raise UnsupportedArchitecture(
        f"model_type {mt!r} is not supported yet; supported: {sorted(LLAMA_LIKE | {'gpt2'} | FUSED)} "
        f"(see docs/checkpoints.md, 'Supported architectures')")


def fused_arch(model: nn.Module) -> Arch:
    """Phi-3 / Phi-4-mini (``qkv_proj`` stacked [q; k; v] with grouped-query k/v, ``gate_up_proj``
    then ``down_proj``) and GPT-NeoX / Pythia (``query_key_value`` interleaved per head,
    ``dense_h_to_4h`` then ``dense_4h_to_h``, parallel residual and partial rotary handled by the
    model's own code). Every fused layer's shape is checked against the config, so a variant laid
    out otherwise is refused here rather than sliced wrongly."""
    cfg, mt = model.config, model.config.model_type
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    if mt == "phi3":
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        arch = Arch("phi3", mt, "model.layers", "self_attn", "mlp", cfg.num_hidden_layers, hidden, heads,
                    getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.intermediate_size,
                    "qkv_proj", "qkv_proj", "down_proj", False, "stacked")
        up = "gate_up_proj"
        up_rows = 2 * arch.intermediate_size
    else:  # gpt_neox: [H, 3, D] rows, no grouped-query attention
        arch = Arch("gpt_neox", mt, "gpt_neox.layers", "attention", "mlp", cfg.num_hidden_layers, hidden,
                    heads, heads, hidden // heads, cfg.intermediate_size, "query_key_value",
                    "query_key_value", "dense_4h_to_h", False, "interleaved")
        up, up_rows = "dense_h_to_4h", arch.intermediate_size
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    for i in range(arch.num_layers):
        for path, want in ((f"{arch.attn_path(i)}.{arch.k_proj}", (hidden, qkv_rows)),
                           (f"{arch.mlp_path(i)}.{up}", (hidden, up_rows)),
                           (f"{arch.mlp_path(i)}.{arch.mlp_down}", (arch.intermediate_size, hidden))):
            try:
                got = linear_shape(model.get_submodule(path))
            except (AttributeError, TypeError) as e:
                raise UnsupportedArchitecture(f"model_type {mt!r}: {path} is not the Linear layer align maps "
                                              f"({e})") from None
            if got != want:
                raise UnsupportedArchitecture(
                    f"model_type {mt!r}: {path} maps {got[0]} -> {got[1]} features, but the config gives "
                    f"{want[0]} -> {want[1]}; align would slice its fused q/k/v or MLP rows wrongly")
    return arch


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


def compute_dtype(module: nn.Module, fallback):
    """The dtype a Linear layer computes in: its weight's, or for a bitsandbytes layer (integer
    storage) its ``compute_dtype`` when set, else ``fallback`` (the activations' dtype)."""
    w = getattr(module, "weight", None)
    if w is not None and w.is_floating_point():
        return w.dtype
    return getattr(module, "compute_dtype", None) or fallback


def longrope_switch(backbone) -> int | None:
    """For a LongRoPE backbone (Phi-3-*-128k, Phi-3.5, Phi-4-mini): the length
    (``original_max_position_embeddings``) past which transformers rotates every position with the
    long factors instead of the short ones, deciding per forward on its largest position; None
    for any other backbone. A cache built under the short factors is not what a forward over the
    whole sequence computes once the sequence passes that length, so ``sample`` rebuilds the cache
    at that step, as transformers' own Phi-3 generation does."""
    cfg = getattr(backbone, "config", None)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type") != "longrope":
        return None
    n = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
    return int(n) if n else None
