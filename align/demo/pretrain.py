"""Pretrain the quickstart's tiny Llama backbone from scratch on the bundled corpus, cached by settings.

This is the only place where every weight trains (the backbone does not exist yet); every stage
after it freezes them. ``ensure_backbone`` returns ``cache_dir/<hash of the settings>/`` holding
``save_pretrained`` model and tokenizer files plus ``pretrain.json`` (settings, final and held-out
loss, parameter count, wall time). The directory is written under a temporary name and renamed into
place, so a run killed midway never leaves a half-written backbone that a later run would trust.
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

from align.demo.tasks import quickstart as task
from align.demo.tiny import build_tiny_model, tiny_config, train_tokenizer


def _stream(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by EOS (so the model learns to stop)."""
    ids = []
    for d in tok(docs, add_special_tokens=False).input_ids:
        ids += d + [tok.eos_token_id]
    return torch.tensor(ids)


def _train(model, data: torch.Tensor, steps: int, batch_size: int, seq_len: int, lr: float,
           starts_gen: torch.Generator) -> float:
    """Every weight of ``model`` on random windows of ``data``; returns the smoothed final loss."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def schedule(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    bar = tqdm(range(steps), desc="pretrain backbone", dynamic_ncols=True)
    smoothed = None
    for step in bar:
        starts = torch.randint(len(data) - seq_len, (batch_size,), generator=starts_gen)
        batch = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{smoothed:.3f}")
    return smoothed


def ensure_backbone(cache_dir: str | Path, *, vocab_size: int = 1024, hidden: int = 128, layers: int = 4,
                    heads: int = 4, steps: int = 600, seed: int = 0, batch_size: int = 32, seq_len: int = 64,
                    lr: float = 3e-3, n_docs: int = 40000, threads: int | None = None) -> Path:
    """Path of a pretrained backbone for these settings, training one first if none is cached.

    Packed batches of ``batch_size`` random windows of ``seq_len`` tokens from the corpus stream,
    AdamW (betas 0.9/0.95, weight decay 0.01 on matrices), linear warmup over 5% of ``steps`` then
    cosine decay to 10% of ``lr``, gradient clipping at 1. ``threads`` (default: all cores, at most
    8) only affects speed, so it is not part of the cache key.
    """
    settings = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, steps=steps, seed=seed,
                    batch_size=batch_size, seq_len=seq_len, lr=lr, n_docs=n_docs, task_version=task.VERSION)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_dir) / key
    if (final / "pretrain.json").exists():
        return final

    t0 = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or min(os.cpu_count() or 1, 8))
    try:
        docs = task.pretrain_corpus(n_docs, seed)
        held_out = task.pretrain_corpus(500, seed + 10_000)
        tok = train_tokenizer(docs, vocab_size)
        config = tiny_config("llama", len(tok), hidden=hidden, layers=layers, heads=heads,
                             max_positions=256, tokenizer=tok)
        model = build_tiny_model(config, seed=seed).train()
        data, eval_data = _stream(tok, docs), _stream(tok, held_out)
        smoothed = _train(model, data, steps, batch_size, seq_len, lr, torch.Generator().manual_seed(seed))
        model.eval()
        with torch.no_grad():
            windows = eval_data[: (len(eval_data) // seq_len) * seq_len].view(-1, seq_len)
            eval_loss = sum(model(input_ids=w, labels=w).loss.item() for w in windows.split(64)) / math.ceil(
                len(windows) / 64)
    finally:
        torch.set_num_threads(old_threads)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {**settings, "final_loss": smoothed, "eval_loss": eval_loss,
                "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                "corpus_tokens": len(data), "seconds": round(time.time() - t0, 1)}
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:             # another process finished the same backbone first: use theirs
            if not (final / "pretrain.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
