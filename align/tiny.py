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
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
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


FAMILIES = ("llama", "gpt2", "qwen2", "phi3", "gpt_neox")


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate: int | None = None,
                max_positions: int = 512, tokenizer: PreTrainedTokenizerFast | None = None, **extra):
    """A small config of the given family. ``kv_heads < heads`` gives grouped-query attention.
    ``extra`` goes to the config class (phi3 / gpt_neox only), e.g. ``use_parallel_residual`` or
    ``sliding_window``.

    phi3 is laid out as Phi-4-mini (partial rotary 0.75, tied embedding and LM head); gpt_neox as
    Pythia (rotary on a quarter of each head, parallel residual, biases)."""
    if extra and family not in ("phi3", "gpt_neox"):
        raise ValueError(f"extra config settings {sorted(extra)} are for phi3 / gpt_neox only")
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
    if family == "gpt2":
        if kv_heads != heads:
            raise ValueError("gpt2 has no grouped-query attention")
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate, n_positions=max_positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "phi3":
        # without a tokenizer, no special ids (Phi3Config's defaults are Phi-3's 32000-token vocabulary's)
        kw = {"partial_rotary_factor": 0.75, "tie_word_embeddings": True, "bos_token_id": None,
              "eos_token_id": None, "pad_token_id": None, "original_max_position_embeddings": max_positions}
        kw.update(ids, **extra)
        return Phi3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, **kw)
    if family == "gpt_neox":
        if kv_heads != heads:
            raise ValueError("gpt_neox has no grouped-query attention")
        kw = {"rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False}
        kw.update(ids, **extra)
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             max_position_embeddings=max_positions, **kw)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


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
