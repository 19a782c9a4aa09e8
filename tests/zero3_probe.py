"""Run under ``accelerate launch`` with the zero3 preset (tests/test_distributed.py): load a
backbone the way every stage does and write what this process then holds, gathered whole, so the
test can compare it with a plain single-process load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(path: str, out: str) -> None:
    from align.backbone import gathered_whole, is_partitioned, load_backbone, load_tokenizer
    from align.distributed import Runtime
    rt = Runtime()
    tok = load_tokenizer(path)
    model = load_backbone(path, tokenizer=tok)
    named = dict(model.named_parameters())
    with gathered_whole(list(named.values())):
        whole = {n: p.detach().clone().contiguous() for n, p in named.items()}
    local = {n: p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for n, p in named.items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(whole, f"{out}/rank{rt.rank}.safetensors")
    (Path(out) / f"rank{rt.rank}.json").write_text(json.dumps({
        "partitioned": is_partitioned(model), "local_numel": local, "vocab": len(tok),
        "added_ids": list(model._align_masked_ids), "fingerprint": getattr(model, "_align_fingerprint", None)}))
    rt.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
