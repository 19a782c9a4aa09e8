"""ShareGPT / Vicuna (FastChat) conversations: ``{"id", "conversations": [{"from", "value"}]}``.

``from`` maps ``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/``bing``/``bard``/``model`` ->
assistant, ``system`` -> system (allowed first); anything else is an error naming the turn.
As in FastChat, leading turns before the first human turn (other than a system turn) are not
part of the conversation, and a trailing human turn has no reply: both are trimmed and kept in
``meta.trimmed``. The remaining turns must alternate user/assistant. Each conversation is one
``{"messages": [...]}`` SFT record; ``id`` and other fields stay in ``meta``.
"""
from __future__ import annotations

from data_tools.base import Source, get, msg, require_object, without
from data_tools.canonical import RecordError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


class ShareGPT(Source):
    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        conv = get(raw, "conversations", where, list)
        turns = []
        for i, t in enumerate(conv):
            who = get(t, "from", where, prefix=f"conversations[{i}].")
            if who.lower() not in ROLES:
                raise RecordError(where, f"conversations[{i}].from", f"unknown speaker {who!r}")
            turns.append((i, ROLES[who.lower()], get(t, "value", where, prefix=f"conversations[{i}].")))
        trimmed = []
        start = 1 if turns and turns[0][1] == "system" else 0
        while start < len(turns) and turns[start][1] != "user":
            trimmed.append(conv[turns.pop(start)[0]])
        while turns and turns[-1][1] != "assistant":
            trimmed.append(conv[turns.pop()[0]])
        body = turns[1:] if turns and turns[0][1] == "system" else turns
        if not body:
            raise RecordError(where, "conversations", "has no human turn followed by an assistant turn")
        for k, (i, role, _) in enumerate(body):
            if role != ("user", "assistant")[k % 2]:
                raise RecordError(where, f"conversations[{i}].from", f"turns must alternate human/assistant; "
                                                                     f"turn {i} is another {role} turn")
        meta = without(raw, "conversations")
        if trimmed:
            meta["trimmed"] = trimmed
        return [{"messages": [msg(role, text) for _, role, text in turns], "meta": meta}]


SOURCE = ShareGPT("sharegpt", "ShareGPT/Vicuna conversations (SFT)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
