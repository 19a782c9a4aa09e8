"""A fixed small GRPO update step must not grow in memory.

The step: the tiny Llama (2 layers, hidden 64) with a 32,768-token vocabulary, so that, as on a
real checkpoint, the LM head's [rows, tokens, vocabulary] tensors are what a careless change
would add; a LoRA policy with gradient checkpointing; 16 responses of 24 tokens after 20-token
prompts; ``response_stats`` and ``grpo_loss`` forward, then backward: what ``align grpo``'s update
runs per chunk. Measured in a fresh process, two ways:

* ``saved``: the bytes autograd keeps for the backward (distinct storages), exact and repeatable;
* ``rise``: the peak resident memory during forward + backward over the memory before it
  (sampled every 2 ms; allocator-dependent, so the margin is wide).

Recorded (CPU, float32, glibc with a fixed 64 KiB mmap threshold so that resident memory follows
live memory): saved 0.62 MiB, rise 48.9 MiB (the head's 16 MiB chunks: logits, probabilities,
gradient weights), repeatable to 0.2 MiB. The logits path that ``align.lmhead`` replaced keeps
48.5 MiB for the backward and rises 191 MiB (``test_the_measure_catches_the_logits_path``); one
[384, 32768] float32 tensor is 48 MiB, so the margins below catch even half of one. Memory targets
against TRL live in benchmarks/ (docs/memory.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = {"saved_mib": 0.62, "rise_mib": 49.0}
MARGIN = {"saved_mib": 1.25, "rise_mib": 24.0}   # saved: x 1.25; rise: + 24 MiB (one [384, V] tensor is 48)

WORKER = r'''
import json, sys, threading, os
import torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from align.demo.tiny import build_tiny_model, default_corpus, tiny_config, train_tokenizer
from align.adapters import AdapterConfig
from align.model import AlignModel
from align.rl.group import grpo_loss
from align.scoring import response_stats
torch.manual_seed(0)
tok = train_tokenizer(default_corpus(), 384)
m = AlignModel(build_tiny_model(tiny_config("llama", 32768, tokenizer=tok), seed=0))
m.add_adapter("policy", AdapterConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
m.add_role("policy", ["policy"])
m.set_trainable(["policy"])
m.enable_gradient_checkpointing()
if sys.argv[2] == "logits":   # the path the fused head replaced: an adapter hook on the head forces it
    m.backbone.get_output_embeddings().register_forward_hook(lambda *a: None)
q = torch.randint(5, 384, (16, 20)); qm = torch.ones_like(q)
r = torch.randint(5, 384, (16, 24)); rm = torch.ones_like(r, dtype=torch.bool)
old = torch.zeros(16, 24); adv = torch.randn(16)

def step():
    lp = response_stats(m, q, qm, r, rm, ("policy",), 1.0)["policy"]["logprobs"]
    loss, _ = grpo_loss(lp, old, old, adv, rm, 0.2, 0.0, "k3", "grpo", 24)
    return loss

step().backward()   # warm up: weights touched, kernels loaded
m.zero_grad(set_to_none=True)
fd = os.open("/proc/self/status", os.O_RDONLY)
def rss():
    f = dict(l.split(":", 1) for l in os.pread(fd, 4096, 0).decode().splitlines() if ":" in l)
    return int(f["VmRSS"].split()[0]) / 1024
peak, stop = [0.0], threading.Event()
def watch():
    while not stop.wait(0.002):
        peak[0] = max(peak[0], rss())
storages = {}
def pack(t):
    s = t.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return t
before = rss()
th = threading.Thread(target=watch, daemon=True); th.start()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = step()
loss.backward()
stop.set(); th.join()
saved = sum(n for ptr, n in storages.items()
            if ptr not in {p.untyped_storage().data_ptr() for p in m.parameters()})
print(json.dumps({"saved_mib": saved / 2**20, "rise_mib": max(peak[0], rss()) - before}))
'''


def measure(path: str) -> dict:
    # a fixed mmap threshold: glibc hands every freed block over 64 KiB back at once, so resident
    # memory follows what is live instead of what the allocator keeps (docs/memory.md)
    r = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), path], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_small_grpo_step_does_not_grow_in_memory():
    got = measure("fused")
    print(f"GRPO step memory: {got} (baseline {BASELINE})")
    assert got["saved_mib"] <= BASELINE["saved_mib"] * MARGIN["saved_mib"], got
    assert got["rise_mib"] <= BASELINE["rise_mib"] + MARGIN["rise_mib"], got


@pytest.mark.slow
def test_the_measure_catches_the_logits_path():
    """The same step through the logits path (an adapter hook on the head forces it) exceeds both
    margins: the test above can fail."""
    got = measure("logits")
    print(f"GRPO step memory, logits path: {got}")
    assert got["saved_mib"] > BASELINE["saved_mib"] * MARGIN["saved_mib"], got
    assert got["rise_mib"] > BASELINE["rise_mib"] + MARGIN["rise_mib"], got
