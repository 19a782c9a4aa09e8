"""Load and freeze the shared backbone (a Hugging Face causal LM) and its tokenizer.

The backbone is loaded once per process; every role is a set of adapters over it. Its weights
never receive gradients or optimizer state (DESIGN invariant 1), and every saved adapter records
its :func:`fingerprint` (invariant 8).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A PAD distinct from EOS (invariant 9). Added as a special token; the embedding matrix is
        # resized by load_backbone only if the id falls outside it.
        tok.add_special_tokens({"pad_token": "<|align_pad|>"})
    return tok


def load_backbone(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                  trust_remote_code: bool = False, tokenizer: PreTrainedTokenizerBase | None = None):
    """Load a causal LM, put it in eval mode (dropout off) and freeze every parameter."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Only happens when load_tokenizer had to add a PAD token. PAD ids are never attended to
        # and their labels are masked, so the new row's values do not matter; resizing before the
        # fingerprint keeps it stable.
        model.resize_token_embeddings(len(tokenizer))
    model.to(device)
    freeze(model)
    return model


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def fingerprint(model: torch.nn.Module) -> str:
    """A content hash of the backbone's weights (and architecture config).

    Tensors are hashed after rounding to bfloat16, so the same checkpoint loaded in fp32 or bf16
    has the same fingerprint while any real difference in weights changes it.
    """
    cached = getattr(model, "_align_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.model_type}|{cfg.vocab_size}|{getattr(cfg, 'hidden_size', '')}".encode())
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in sorted(model.state_dict().items()):
        p = params.get(name)
        if p is not None and hasattr(p, "ds_id"):  # partitioned at load under ZeRO-3: gather one at a time
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone()
        t = t.detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    fp = "sha256:" + h.hexdigest()[:32]
    model._align_fingerprint = fp
    return fp
