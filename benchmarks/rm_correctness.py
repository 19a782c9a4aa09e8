"""Can the learned reward see correctness? A reward run's accuracy on held-out pairs that differ
only in correctness: the right answer against the same answer with the distractor (or a sum off
by one), same length, both ended (the task's ``correctness_pairs``), overall, per question kind
and per answer style, beside its accuracy on the pipeline's ordinary held-out rankings.

    python benchmarks/rm_correctness.py runs/smollm2/reward [more reward runs] \\
        --task align.demo.tasks.short_answers --n 384 --chat --out benchmarks/results/rm_correctness_smollm2

Writes ``<out>.json`` and ``<out>.md`` (a row per reward run).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _acc(d: torch.Tensor) -> dict:
    p = float((d > 0).float().mean()) if len(d) else float("nan")
    return {"accuracy": p, "sem": math.sqrt(p * (1 - p) / len(d)) if len(d) else float("nan"), "pairs": len(d)}


@torch.no_grad()
def measure(reward_run: str, pairs: list[dict], chat: bool, max_length: int) -> dict:
    from align.config import ModelConfig
    from align.data.common import as_chat
    from align.data.preferences import to_group, tokenize_groups
    from align.distributed import Runtime
    from align.scoring import load_reward_role
    from align.stages.common import backbone_from_run, load_model
    from align.stages.reward import score_groups
    rec = backbone_from_run(reward_run)
    rt = Runtime()
    _, model = None, None
    tok, model = load_model(rec["path"], ModelConfig(path=rec["path"], dtype=rec.get("dtype", "float32"),
                                                     quantization=rec.get("quantization", "none")), rt.device)
    load_reward_role(model, reward_run)
    model.eval()
    recs = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    groups = [to_group(as_chat(r) if chat else r, f"pair {i}") for i, r in enumerate(recs, 1)]
    tgroups, _, refused = tokenize_groups(groups, tok, max_length)
    if refused:
        raise SystemExit(f"{len(refused)} pairs do not fit max_length={max_length}")
    with model.use("reward"):
        scores = score_groups(model, tgroups, tok.pad_token_id, rt.device, 32)
    # each group holds [chosen, rejected] in the order given (to_group keeps it; rank 0 first)
    d = torch.stack([s[0] - s[1] for s in scores])
    out = {"all": _acc(d)}
    for key in ("kind", "style"):
        for v in sorted({p[key] for p in pairs}):
            idx = torch.tensor([p[key] == v for p in pairs])
            out[f"{key}={v}"] = _acc(d[idx])
    summary = json.loads((Path(reward_run) / "summary.json").read_text())
    out["heldout_rankings_accuracy"] = summary.get("eval/accuracy")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reward_runs", nargs="+")
    ap.add_argument("--task", default="align.demo.tasks.short_answers")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--n", type=int, default=384, help="questions (two pairs each: short and sentence style)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="pairs rendered with the chat template (as trained)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    pairs = importlib.import_module(a.task).correctness_pairs(a.split, a.n, a.seed)
    res = {r: measure(r, pairs, a.chat, a.max_length) for r in a.reward_runs}
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(res, indent=2))
        cols = [k for k in next(iter(res.values())) if k != "heldout_rankings_accuracy"]
        lines = ["| reward run | held-out rankings | " + " | ".join(f"correctness pairs: {c}" for c in cols) + " |",
                 "|---|---|" + "---|" * len(cols)]
        for r, m in res.items():
            h = m["heldout_rankings_accuracy"]
            lines.append(f"| {r} | {'—' if h is None else f'{h:.3f}'} | " + " | ".join(
                f"{m[c]['accuracy']:.3f} ± {m[c]['sem']:.3f} (n={m[c]['pairs']})" for c in cols) + " |")
        Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
