"""A simulated annotator that ranks K responses per prompt and writes a Label Studio export.

Noise model: Plackett-Luce with utilities ``gold / beta``. The annotator picks the best response
with probability proportional to ``exp(gold / beta)``, then the best of the rest the same way, and
so on (sampled exactly with the Gumbel-max trick: sort by ``gold / beta + Gumbel noise``). So any two
responses of a ranking, for any K, are ordered as Bradley-Terry says, since the difference of two
Gumbel variables is logistic: ``P(a ranked above b) = sigmoid((gold_a - gold_b) / beta)``.

``beta`` is the noise temperature, in gold units: two responses whose gold differs by ``beta`` are
ordered correctly with probability sigmoid(1) ~ 0.73, by ``3 * beta`` with ~ 0.95. ``beta -> 0``
always follows gold (``beta == 0`` is allowed: noiseless, ties broken at random); ``beta -> inf``
ranks uniformly at random. Several ``annotators`` rank each task independently.

The export is Label Studio's full JSON export (reference: annotation-formats.md §7a, §7c) for the
*LLM Ranker* template, ``<List name="answers" value="$items"/>`` + ``<Ranker name="rank"
toName="answers"/>``: a JSON array with one task per prompt, ``data = {"prompt", "items": [{"id",
"title", "body"}, ...]}``, and per annotator one annotation whose single result is
``{"type": "ranker", "from_name": "rank", "to_name": "answers", "origin": "manual",
"value": {"ranker": {"rank": [item ids, best first]}}}`` (rank mode: the only key is the Ranker
tag's name). Item bodies are the response texts without special tokens; each item also carries
``ended`` (did the response stop with the stop token) as an extra field, which Label Studio keeps.
The gold scores themselves are not written: they stay hidden, as a human's judgement would.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Callable

TIMESTAMP = "2024-01-01T00:00:00.000000Z"   # fixed, so exports are byte-identical for a seed
PROJECT = 1


def plackett_luce_order(gold: list[float], beta: float, rng: random.Random) -> list[int]:
    """Indices of ``gold`` best first, drawn from Plackett-Luce with utilities ``gold / beta``."""
    gumbel = [-math.log(-math.log(rng.random() or 1e-300)) for _ in gold]
    if beta == 0:
        keys = [(g, n) for g, n in zip(gold, gumbel)]
    else:
        keys = [(g / beta + n, 0.0) for g, n in zip(gold, gumbel)]
    return sorted(range(len(gold)), key=lambda i: keys[i], reverse=True)


def _result_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    return "".join(rng.choice(alphabet) for _ in range(10))


def simulate_label_studio_ranker(prompts: list[str], responses: list[list[str]], ended: list[list[bool]], *,
                                 gold_fn: Callable[[str, str, bool], float], beta: float, seed: int,
                                 annotators: int = 1) -> list[dict]:
    """A Label Studio Ranker export (list of tasks) ranking ``responses[i]`` for ``prompts[i]``.

    ``gold_fn(prompt, response, ended) -> float`` is the hidden scorer; ``beta`` >= 0 the noise
    temperature (module docstring); the rankings are deterministic given ``seed``.
    """
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} response lists, "
                         f"{len(ended)} ended lists")
    if beta < 0 or annotators < 1:
        raise ValueError(f"need beta >= 0 and annotators >= 1 (got beta={beta}, annotators={annotators})")
    rng = random.Random(f"annotator-{seed}")
    tasks = []
    for t, (prompt, resp, end) in enumerate(zip(prompts, responses, ended)):
        if len(resp) != len(end):
            raise ValueError(f"task {t}: {len(resp)} responses but {len(end)} ended flags")
        task_id = t + 1
        items = [{"id": f"response_{k + 1}", "title": f"Response {k + 1}", "body": r, "ended": bool(e)}
                 for k, (r, e) in enumerate(zip(resp, end))]
        gold = [float(gold_fn(prompt, r, bool(e))) for r, e in zip(resp, end)]
        annotations = []
        for a in range(annotators):
            order = plackett_luce_order(gold, beta, rng)
            annotations.append({
                "id": t * annotators + a + 1,
                "completed_by": a + 1,
                "result": [{"value": {"ranker": {"rank": [items[i]["id"] for i in order]}},
                            "id": _result_id(rng), "from_name": "rank", "to_name": "answers",
                            "type": "ranker", "origin": "manual"}],
                "was_cancelled": False, "ground_truth": False,
                "created_at": TIMESTAMP, "updated_at": TIMESTAMP, "lead_time": 0.0,
                "task": task_id, "project": PROJECT,
            })
        tasks.append({
            "id": task_id, "data": {"prompt": prompt, "items": items}, "annotations": annotations,
            "drafts": [], "predictions": [], "meta": {"simulated_annotator": {"beta": beta, "seed": seed}},
            "created_at": TIMESTAMP, "updated_at": TIMESTAMP, "inner_id": task_id,
            "total_annotations": annotators, "cancelled_annotations": 0, "total_predictions": 0,
            "project": PROJECT,
        })
    return tasks


def write_export(tasks: list[dict], path: str | Path) -> Path:
    """Write ``tasks`` as a Label Studio JSON export file (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(tasks, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
