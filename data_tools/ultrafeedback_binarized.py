"""HuggingFaceH4/ultrafeedback_binarized (``train_prefs`` / ``test_prefs``; Parquet or JSONL).

``chosen`` and ``rejected`` are full conversations; the prompt is the conversation before the
final assistant turn (which must be the same in both), chosen/rejected are that final turn.
``score_chosen == score_rejected`` happens (the rejected completion was drawn at random among
the others) and is kept as a tie: a ranking with ``ranks [0, 0]``. ``prompt_id`` and the scores
stay in ``meta``; ``messages`` too when it differs from ``chosen`` (in the prefs splits it
equals ``chosen``), and ``prompt`` when it differs from the first user turn.
"""
from __future__ import annotations

from data_tools.base import Source, get, judged, msg, require_object, without
from data_tools.canonical import RecordError


def conversation(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(where, field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        role = get(m, "role", where, prefix=f"{field}[{i}].")
        out.append(msg(role, get(m, "content", where, prefix=f"{field}[{i}].")))
    if out[-1]["role"] != "assistant":
        raise RecordError(where, f"{field}[{len(out) - 1}].role", "the last message must be the assistant's")
    return out


class UltraFeedbackBinarized(Source):
    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        chosen = conversation(raw.get("chosen"), where, "chosen")
        rejected = conversation(raw.get("rejected"), where, "rejected")
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise RecordError(where, "rejected", "its conversation before the final turn differs from chosen's")
        if not prompt:
            raise RecordError(where, "chosen", "has no prompt turn before the assistant's reply")
        meta = without(raw, "chosen", "rejected", "messages", "prompt")
        if "messages" in raw and raw["messages"] != raw["chosen"]:
            meta["messages"] = raw["messages"]
        if "prompt" in raw and raw["prompt"] != prompt[0]["content"]:
            meta["prompt"] = raw["prompt"]
        sc, sr = raw.get("score_chosen"), raw.get("score_rejected")
        ranks = [0, 0] if sc is not None and sc == sr else [0, 1]
        return [judged(prompt, [chosen[-1:], rejected[-1:]], ranks, meta=meta)]


SOURCE = UltraFeedbackBinarized("ultrafeedback-binarized", "HuggingFaceH4/ultrafeedback_binarized preference splits")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
