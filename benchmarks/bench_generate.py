"""Generation throughput: align's KV-cache sampler (a role over the shared backbone, LoRA live)
against plain ``model.generate`` of the same model (no adapters), pure sampling, full length.

    python benchmarks/bench_generate.py --size 1b --device cuda --batch 64 --new-tokens 128

Both sample ``--new-tokens`` tokens for every row (align: no stop token; generate: min_new_tokens
= max_new_tokens, top_k=0, top_p=1), from the same left-padded prompts, in bf16 on CUDA (fp32 on
CPU). Tokens/s = batch x new tokens / wall time, median over ``--reps`` timed runs after a warm-up,
in one process (the two share nothing that one could warm for the other).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "100m", "1b", "smollm2"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    import torch
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    from align.adapters import AdapterConfig
    from align.backbone import load_backbone, load_tokenizer
    from align.generation import sample
    from align.model import AlignModel
    from align.scoring import left_pad
    from benchmarks.bench_ppo import PROMPTS
    from benchmarks.common import machine, model_dir, table, write_results
    path = model_dir(a.size)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = load_tokenizer(path)
    backbone = load_backbone(path, tokenizer=tok).to(device=a.device, dtype=dtype).eval()
    model = AlignModel(backbone)
    model.add_adapter("policy", AdapterConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    model.adapters["policy"].to(device=a.device, dtype=dtype)
    model.add_role("policy", ["policy"])
    prompts = (PROMPTS * (a.batch // len(PROMPTS) + 1))[:a.batch]
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids for p in prompts], tok.pad_token_id, a.device)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(a.reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(a.batch * a.new_tokens / (time.perf_counter() - t))
        return statistics.median(out)

    g = torch.Generator(device=a.device).manual_seed(0)
    align_tps = timed(lambda: sample(model, ids, mask, role="policy", max_new_tokens=a.new_tokens,
                                     temperature=1.0, stop_token_id=None, pad_token_id=tok.pad_token_id,
                                     generator=g))
    with torch.no_grad():
        hf_tps = timed(lambda: backbone.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                                 top_p=1.0, max_new_tokens=a.new_tokens,
                                                 min_new_tokens=a.new_tokens, pad_token_id=tok.pad_token_id))
    res = {"align": {"tokens_per_s": align_tps}, "trl": {"tokens_per_s": hf_tps}}
    md = table(f"Generation, {a.size} Llama, {a.device}, batch {a.batch}, {a.new_tokens} new tokens "
               f"(right column: plain `model.generate`, no adapters)",
               [("tokens_per_s", "generated tokens / s")], res["align"], res["trl"], {})
    md = md.replace("| metric | align | TRL | align / TRL |", "| metric | align | model.generate | align / generate |")
    write_results(f"generate_{a.size}_{a.device}", {"benchmark": "generate", "size": a.size, "device": a.device,
                                                    "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                                    "args": vars(a), "results": res}, md, Path(a.out))


if __name__ == "__main__":
    main()
