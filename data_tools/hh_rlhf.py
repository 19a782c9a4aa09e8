"""Anthropic HH-RLHF: ``{"chosen": dialogue, "rejected": dialogue}`` lines (``*.jsonl.gz``).

Each dialogue is split into turns on ``"\\n\\nHuman: "`` / ``"\\n\\nAssistant: "`` only (``Human:``
inside assistant text without the blank line is text). The prompt is the turns both dialogues
share, up to the first turn where they differ, which must be an Assistant turn in both; chosen and
rejected are one assistant message each holding everything after that turn's delimiter, verbatim.
That also covers the dialogues that diverge before the last turn because the model wrote an
inline ``Human: ... \\n\\nAssistant: ...`` continuation (the continuation is the model's output).
An empty final reply (``"...\\n\\nAssistant: "``) is a real, chosen refusal in the harmless data,
so empty completions are kept by default. Identical chosen and rejected carry no preference
and are dropped (counted).
"""
from __future__ import annotations

import re

from data_tools.base import Dropped, Source, get, msg, require_object, without
from data_tools.canonical import RecordError

_DELIM = re.compile(r"\n\n(Human|Assistant): ")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def turns(text: str, where: str, field: str) -> list[tuple[str, str, int]]:
    """(role, content, offset of the content in text) per turn."""
    if text.endswith(("\n\nAssistant:", "\n\nHuman:")):        # a final delimiter without its space
        text += " "
    found = list(_DELIM.finditer(text))
    if not found or found[0].start() != 0:
        raise RecordError(where, field, 'a dialogue must start with "\\n\\nHuman: "')
    out = []
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        out.append((_ROLES[m.group(1)], text[m.end():end], m.end()))
    if out[0][0] != "user":
        raise RecordError(where, field, 'a dialogue must start with "\\n\\nHuman: "')
    return out


class HHRLHF(Source):
    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        if "transcript" in raw:
            raise RecordError(item.where, "transcript", "this is the red-team-attempts schema (transcripts rated "
                                                        "for attack success), not preference pairs")
        where = item.where
        chosen, rejected = get(raw, "chosen", where), get(raw, "rejected", where)
        if chosen == rejected:
            raise Dropped("chosen and rejected are identical (no preference)")
        tc, tr = turns(chosen, where, "chosen"), turns(rejected, where, "rejected")
        d = 0
        while d < min(len(tc), len(tr)) and tc[d][:2] == tr[d][:2]:
            d += 1
        if d >= len(tc) or d >= len(tr):
            raise RecordError(where, "chosen" if d >= len(tc) else "rejected",
                              f"one dialogue is the other's beginning (they share all {d} turns of the shorter)")
        if tc[d][0] != "assistant" or tr[d][0] != "assistant":
            raise RecordError(where, "chosen", f"the dialogues first differ at turn {d + 1}, a Human turn; only "
                                               "a difference in the Assistant's reply is a preference")
        return [{
            "prompt": [msg(role, content) for role, content, _ in tc[:d]],
            "chosen": [msg("assistant", chosen[tc[d][2]:])],
            "rejected": [msg("assistant", rejected[tr[d][2]:])],
            "meta": without(raw, "chosen", "rejected"),
        }]


SOURCE = HHRLHF("hh-rlhf", "Anthropic HH-RLHF {chosen, rejected} dialogues (jsonl/jsonl.gz)", empty_completions="keep")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
