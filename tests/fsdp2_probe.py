"""Run under ``accelerate launch`` with the fsdp2 preset (tests/test_distributed.py): inside
``Runtime.generation`` (gathering) each process makes a different number of no-grad forwards, as
sampling does when one process's rows stop first; none of them may wait on another process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(path: str, out: str) -> None:
    from align.adapters import AdapterConfig
    from align.distributed import Runtime
    from align.fsdp import is_sharded
    from tests.conftest import load
    rt = Runtime()
    torch.manual_seed(0)
    model, _ = load(path)
    model.add_adapter("policy", AdapterConfig(method="lora", r=4, alpha=8))
    model.add_role("policy", ["policy"])
    params = model.set_trainable(["policy"])
    model, _ = rt.prepare(model, torch.optim.AdamW(params, lr=1e-3))
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with rt.generation(model) as all_done:
            assert all_done is None
            for _ in range(1 + 2 * rt.rank):  # rank 0: 1 forward, rank 1: 3
                logits = model(ids, role="policy").logits
        sharded_after = all(is_sharded(p) for p in model.backbone.parameters())
    rt.barrier()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rt.rank}.json").write_text(json.dumps(
        {"sharded_after": sharded_after, "logit0": float(logits[0, -1, 0])}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
