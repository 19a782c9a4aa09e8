"""Shared fixtures: tiny backbones built offline (tokenizer trained on local text)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Saved tiny models by family: llama (with GQA), gpt2, qwen2."""
    from align.tiny import make_tiny
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny(root / "llama", "llama", kv_heads=2),
        "gpt2": make_tiny(root / "gpt2", "gpt2"),
        "qwen2": make_tiny(root / "qwen2", "qwen2", kv_heads=2),
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_paths):
    return tiny_paths["llama"]


def load(path):
    from align.backbone import load_backbone, load_tokenizer
    from align.model import AlignModel
    tok = load_tokenizer(path)
    return AlignModel(load_backbone(path, tokenizer=tok)), tok
