"""Pretrain the quickstart's tiny Llama from scratch on the bundled corpus (cached by settings).

This is the one place where all weights train (the backbone does not exist yet); every stage
after it freezes them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.quickstart import task
from align.tiny import build_tiny_model, tiny_config, train_tokenizer


def ensure_backbone(cache_dir: str | Path, *, vocab_size: int = 1024, hidden: int = 128, layers: int = 4,
                    heads: int = 4, steps: int = 600, seed: int = 0, batch_size: int = 32,
                    seq_len: int = 64, lr: float = 3e-3, n_docs: int = 30000) -> Path:
    settings = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, steps=steps, seed=seed,
                    batch_size=batch_size, seq_len=seq_len, lr=lr, n_docs=n_docs, version=1)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(cache_dir) / f"tiny-llama-{key}"
    if (final / "pretrain.json").exists():
        return final
    t0 = time.time()
    torch.manual_seed(seed)
    docs = task.pretrain_corpus(n_docs, seed)
    demo_text = [d["prompt"] + d["completion"] for d in task.sft_demonstrations(2000, seed + 100)]
    tok = train_tokenizer(docs + demo_text + task.prompts("eval", 200, seed), vocab_size)
    model = build_tiny_model(tiny_config("llama", len(tok), hidden=hidden, layers=layers, heads=heads,
                                         max_positions=256, tokenizer=tok), seed=seed)
    # one long token stream of documents separated by EOS, cut into fixed windows
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    data = torch.tensor(stream[: (len(stream) // seq_len) * seq_len]).view(-1, seq_len)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="pretrain backbone", dynamic_ncols=True):
        batch = data[torch.randint(len(data), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pretrain.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(
            {**settings, "final_loss": float(loss), "seconds": time.time() - t0,
             "params": sum(p.numel() for p in model.parameters()), "tokens_in_corpus": len(stream)}, indent=2))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
