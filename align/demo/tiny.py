"""Tiny models built offline: a byte-level BPE tokenizer trained on local text and a small
causal LM built from a config, both saved with ``save_pretrained`` so every stage loads them by
path exactly as it would load a real model. Nothing is fetched from a hub.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

# Special tokens. PAD is distinct from EOS (docs/invariants.md #9): a policy can only learn to stop
# if its stop token is never masked away as padding.
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a HF fast tokenizer."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )
    assert hf.pad_token_id != hf.eos_token_id
    return hf


FAMILIES = ("llama", "gpt2", "qwen2", "qwen3", "gemma3_text", "gemma3", "phi3", "gpt_neox")


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate: int | None = None,
                max_positions: int = 512, tokenizer: PreTrainedTokenizerFast | None = None,
                sliding_window: int | None = None, **extra):
    """A small config of the given family, the real transformers config class. ``kv_heads < heads``
    gives grouped-query attention. ``extra``: further fields of that class (e.g. Gemma-3's
    ``final_logit_softcapping``, GPT-NeoX's ``use_parallel_residual``).

    * ``qwen3``: Qwen3's QK-norm blocks (``q_norm``/``k_norm`` over each head), untied head.
    * ``gemma3_text``: Gemma-3's language model: QK-norm, local (``sliding_window``, default 4, RoPE
      base 10k) and global (RoPE base 1M) layers alternating (``layer_types``; with 2 layers one of
      each), ``query_pre_attn_scalar`` = 1.5 x head_dim so its softmax scale is not the usual
      head_dim^-1/2, sqrt(hidden)-scaled embeddings, tied LM head.
    * ``gemma3``: the multimodal Gemma-3 (``Gemma3ForConditionalGeneration``) with that text model
      and a one-layer SigLIP vision tower, to check that align loads its language model alone.
    * ``phi3``: laid out as Phi-4-mini (partial rotary 0.75, tied embedding and LM head; a
      ``sliding_window`` when given); ``gpt_neox`` as Pythia (rotary on a quarter of each head,
      parallel residual, biases).
    """
    if extra and family not in ("phi3", "gpt_neox", "qwen3", "gemma3_text", "gemma3"):
        raise ValueError(f"extra config settings {sorted(extra)} are not for {family}")
    if sliding_window is not None and family not in ("gemma3_text", "gemma3", "phi3"):
        raise ValueError(f"sliding_window is a setting of gemma3_text / gemma3 / phi3, not {family}")
    kv_heads = kv_heads or heads
    intermediate = intermediate or 4 * hidden
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, attention_dropout=0.0, **ids)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, **ids)
    if family == "qwen3":
        return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=hidden // heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, **ids, **extra)
    if family == "gemma3_text":
        head_dim = hidden // heads
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                head_dim=head_dim, query_pre_attn_scalar=head_dim * 3 // 2,
                                sliding_window=sliding_window or 4, layer_types=types,
                                max_position_embeddings=max_positions, tie_word_embeddings=True, **ids, **extra)
    if family == "gemma3":
        text = tiny_config("gemma3_text", vocab_size, hidden, layers, heads, kv_heads, intermediate,
                           max_positions, tokenizer, sliding_window, **extra)
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        # the image placeholder ids are the vocabulary's last three (text-only inputs avoid them)
        return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                            image_token_index=vocab_size - 1, boi_token_index=vocab_size - 3,
                            eoi_token_index=vocab_size - 2, **ids)
    if family == "gpt2":
        if kv_heads != heads:
            raise ValueError("gpt2 has no grouped-query attention")
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate, n_positions=max_positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family in ("phi3", "gpt_neox"):
        return _fused_config(family, vocab_size, hidden, layers, heads, kv_heads, intermediate, max_positions, ids,
                             sliding_window, extra)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _fused_config(family: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                  intermediate: int, max_positions: int, ids: dict, sliding_window: int | None, extra: dict):
    """``tiny_config``'s phi3 (Phi-4-mini's layout) and gpt_neox (Pythia's) configs."""
    if family == "phi3":
        # without a tokenizer, no special ids (Phi3Config's defaults are Phi-3's 32000-token vocabulary's)
        kw = {"partial_rotary_factor": 0.75, "tie_word_embeddings": True, "bos_token_id": None,
              "eos_token_id": None, "pad_token_id": None, "original_max_position_embeddings": max_positions}
        if sliding_window is not None:
            kw["sliding_window"] = sliding_window
        kw.update(ids, **extra)
        return Phi3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, **kw)
    if kv_heads != heads:   # gpt_neox
        raise ValueError("gpt_neox has no grouped-query attention")
    kw = {"rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False}
    kw.update(ids, **extra)
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_positions, **kw)


def build_tiny_model(config, seed: int = 0):
    """Randomly initialised causal LM from ``config`` (deterministic given ``seed``)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def default_corpus() -> list[str]:
    """A small built-in English corpus for tokenizer training in tests (no files needed)."""
    words = ("the quick brown fox jumps over a lazy dog while happy people sing good songs "
             "and sad clouds bring bad rain but great sun makes wonderful days for everyone "
             "review movie film story plot actor scene music ending was is very not really").split()
    lines = []
    for i in range(400):
        n = 6 + i % 9
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)) + ".")
    return lines


def make_tiny(path: str | os.PathLike, family: str = "llama", texts: Iterable[str] | None = None,
              vocab_size: int = 384, seed: int = 0, **config_kwargs) -> Path:
    """Train a tokenizer, build a tiny model and ``save_pretrained`` both into ``path``."""
    path = Path(path)
    tokenizer = train_tokenizer(texts if texts is not None else default_corpus(), vocab_size)
    config = tiny_config(family, len(tokenizer), tokenizer=tokenizer, **config_kwargs)
    model = build_tiny_model(config, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
