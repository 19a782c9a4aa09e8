"""Conversations: checking message lists, the chat template's own assistant mask, and cutting a
conversation prompt from the left by whole turns.

A conversation is a list of ``{"role", "content"}`` messages (roles ``system``, ``user``,
``assistant``, ``tool``; an assistant message may carry ``tool_calls`` instead of text). Every
message goes through the chat template as it is; only assistant messages are ever trained on.

Where the template marks the assistant's text with ``{% generation %}`` ... ``{% endgeneration %}``,
transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` says which tokens
the assistant wrote, and SFT takes those (``marked_conversation``); other templates are rendered
turn by turn (align/data/sft.py) to the same effect.
"""
from __future__ import annotations

import re

IGNORE = -100   # the label of a token that carries no loss (cross-entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool")
PROMPT_ENDS = ("user", "tool")      # a prompt ends with one of these; the completion is the next assistant turn
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_messages(msgs, field: str, *, prompt: bool = False) -> list:
    """``msgs`` when it is a conversation: a non-empty list of messages with a known ``role`` and a
    ``content`` (text, a list of parts, or, for an assistant message with ``tool_calls``, none).
    ``prompt``: it must also end with a user or tool turn. Errors name ``field`` and the message."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"field {field!r} must be a non-empty list of messages, got {type(msgs).__name__}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"field {field!r}: message {j} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"field {field!r}: message {j} has role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise ValueError(f"field {field!r}: message {j}: 'tool_calls' must be a list on an assistant message")
        if content is None and not calls:
            raise ValueError(f"field {field!r}: message {j} ({role}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"field {field!r}: message {j}: 'content' must be text, got {type(content).__name__}")
    if prompt and msgs[-1]["role"] not in PROMPT_ENDS:
        raise ValueError(f"field {field!r}: a prompt conversation ends with a user (or tool) turn, the completion "
                         f"being the next assistant turn; this one's last turn is {msgs[-1]['role']!r}")
    return msgs


def template_of(tokenizer, chat_template: str | None = None) -> str:
    """The chat template in use: ``data.chat_template`` when given, else the tokenizer's."""
    tpl = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):       # named templates: the default one
        tpl = tpl.get("default", "")
    return tpl or ""


def has_generation_marks(tokenizer, chat_template: str | None = None) -> bool:
    return bool(GENERATION_TAG.search(template_of(tokenizer, chat_template)))


def template_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with a template's own refusal (Jinja's ``raise_exception``, e.g.
    Gemma's "System role not supported") turned into a ValueError saying so."""
    from jinja2.exceptions import TemplateError
    try:
        return fn(*args, **kwargs)
    except TemplateError as e:
        raise ValueError(f"the chat template refused the conversation: {e}") from None


def _trained_runs(ids: list[int], mask: list[int], stops: set[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of masked tokens, each ending at its first stop token (what a
    template writes after it inside the generation block, a newline say, is not the response)."""
    runs, i = [], 0
    while i < len(ids):
        if not mask[i]:
            i += 1
            continue
        j = i
        while j < len(ids) and mask[j]:
            j += 1
        end = next((k + 1 for k in range(i, j) if ids[k] in stops), j)
        runs.append((i, end))
        i = j
    return runs


def marked_conversation(record: dict, tokenizer, chat_template: str | None, max_length: int, report):
    """(input ids, labels) of a ``messages`` record from the template's ``{% generation %}`` mask:
    the whole conversation tokenized at once, the tokens the mask gives the assistant labelled
    (each turn up to its stop token), nothing after the last of them. Turns past ``max_length`` are
    dropped whole (counted in ``report``); None when not even the first turn fits (the caller then
    truncates the prompt as for a single turn)."""
    from align.tokens import specials
    sp = specials(tokenizer)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    out = template_call(tokenizer.apply_chat_template, record["messages"], tools=record.get("tools") or None,
                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    full = sp.with_bos(ids)
    mask = [0] * (len(full) - len(ids)) + mask
    runs = _trained_runs(full, mask, set(sp.stop_ids))
    if not runs:
        raise ValueError("the chat template's {% generation %} block marks no token of any assistant turn")
    fit = [r for r in runs if r[1] <= max_length]
    if not fit:
        return None
    report.examples += 1
    report.turns_dropped += len(runs) - len(fit)
    end = fit[-1][1]
    labels = [IGNORE] * end
    for a, b in fit:
        labels[a:b] = full[a:b]
    return full[:end], labels


def drop_oldest_turns(msgs: list, fits) -> tuple[list, int]:
    """``msgs`` (a prompt conversation) with its oldest turns dropped, whole, until ``fits(msgs)``:
    the system turns in front stay, what is kept starts at a user turn, and the last user turn
    and what follows it always stay (a prompt still too long is then cut by tokens). Returns the
    kept messages and how many were dropped."""
    head = 0
    while head < len(msgs) and msgs[head]["role"] == "system":
        head += 1
    body = msgs[head:]
    starts = [0] + [i for i, m in enumerate(body) if i > 0 and m["role"] == "user"]
    for s in starts:
        kept = msgs[:head] + body[s:]
        if fits(kept):
            return kept, s
    return msgs[:head] + body[starts[-1]:], starts[-1]
