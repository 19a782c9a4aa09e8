"""A simulated annotator that ranks K responses per prompt and exports a Label Studio project.

Rankings are drawn from the Plackett-Luce model with utilities ``gold / beta``: an annotator puts
a response first with probability proportional to ``exp(gold / beta)``, then the next among the
rest, and so on (the Gumbel-max trick). For K = 2 this is exactly Bradley-Terry with
``P(a > b) = sigmoid((gold_a - gold_b) / beta)``. ``beta`` is the noise temperature: as it goes to
0 the annotator always follows gold; as it grows rankings become uniformly random.

The export is Label Studio's full JSON export for the "LLM Ranker" template: one task per prompt
with ``data = {"prompt", "items": [{"id", "title", "body"}]}`` and, per annotator, an annotation
whose result is ``{"type": "ranker", "from_name": "rank", "to_name": "answers",
"value": {"ranker": {"rank": [item ids, best first]}}}`` (reference: annotation-formats.md §7).
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path


def plackett_luce_order(utilities: list[float], rng: random.Random) -> list[int]:
    """Indices best-first, sampled with the Gumbel-max trick."""
    keys = [u - math.log(-math.log(rng.random() or 1e-300)) for u in utilities]
    return sorted(range(len(utilities)), key=lambda i: -keys[i])


def simulate_label_studio_ranker(prompts: list[str], responses: list[list[str]], ended: list[list[bool]], *,
                                 gold_fn, beta: float, seed: int, annotators: int = 1) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for t, (prompt, resp, end) in enumerate(zip(prompts, responses, ended)):
        items = [{"id": f"r{k}", "title": f"Response {k + 1}", "body": r} for k, r in enumerate(resp)]
        utilities = [gold_fn(prompt, r, e) / beta for r, e in zip(resp, end)]
        anns = []
        for a in range(annotators):
            order = plackett_luce_order(utilities, rng)
            anns.append({
                "id": t * annotators + a + 1, "completed_by": a + 1, "was_cancelled": False,
                "ground_truth": False, "lead_time": 0.0,
                "result": [{"value": {"ranker": {"rank": [items[i]["id"] for i in order]}},
                            "id": f"sim{t:06d}{a:02d}", "from_name": "rank", "to_name": "answers",
                            "type": "ranker", "origin": "manual"}],
            })
        tasks.append({"id": t + 1, "data": {"prompt": prompt, "items": items}, "annotations": anns,
                      "drafts": [], "predictions": [], "meta": {"simulated": True}})
    return tasks


def write_export(tasks: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ls_export.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(tasks, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)
    return path
