"""SFT examples: the dataset formats users know from TRL, tokenized with completion-only labels.

Accepted records (canonical format, data_tools/README.md): ``{"prompt", "completion"}`` with
strings (standard) or message lists (conversational), or ``{"messages": [...]}``: with
``turns="all"`` (``data.train_turns``) (default, as TRL's ``assistant_only_loss``) every assistant turn is a
completion the loss is taken on, the user/system turns and the template's markup between them
context; with ``"last"`` only the last assistant turn (earlier ones are prompt). Conversations are rendered with
the tokenizer's chat template, or ``data.chat_template`` for tokenizers without one.

Prompt and completion are tokenized separately (as the policy will later see them: prompt
tokens, then generated tokens). The prompt starts with the tokenizer's BOS (once); the completion
ends at its first stop token (a chat template's end of turn such as ChatML's ``<|im_end|>``; what
the template writes after it, e.g. a newline, is not part of the response) or, when it has none,
gets the EOS appended: one definition of "the response ends here" (align/tokens.py) shared with
reward data, rollouts and evaluation. Truncation never drops a completion silently: the prompt is
cut from the left first; only a completion that alone exceeds the budget is cut, and every cut is
counted and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.data.chat import (  # IGNORE is defined there (align.data.sft.IGNORE stays its public name)
    IGNORE,
    check_messages,
    drop_oldest_turns,
    has_generation_marks,
    marked_conversation,
    template_call,
)
from align.data.records import where_of
from align.tokens import encode, specials



@dataclass
class TruncationReport:
    examples: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0   # completion cut (its EOS lost)
    dropped: int = 0                # no completion token fits at all (counted, never silent)
    turns_dropped: int = 0          # later assistant turns of a conversation beyond max_length
    prompt_turns_dropped: int = 0   # oldest messages of conversation prompts dropped whole to fit max_length
    conversations_split: int = 0    # conversations whose template re-renders earlier turns: one example per turn

    def as_dict(self):
        return dict(self.__dict__)


def render(record: dict, tokenizer, chat_template: str | None = None) -> tuple[str, str]:
    """(prompt text, completion text) of one record.

    Conversations go through TRL's ``apply_chat_template`` (prompt rendered with the generation
    prompt, the completion as the rest of the rendered conversation, with TRL's handling of templates
    that render the prompt differently alone); a ``messages`` record is split before its last
    assistant turn, which is what the loss is taken on. A record's ``tools`` (function schemas)
    reach the template as its ``tools``."""

    if "messages" in record:
        msgs = check_messages(record["messages"], "messages")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a 'messages' record needs at least one assistant turn")
        prompt_msgs, completion_msgs = msgs[:last], msgs[last:last + 1]
    else:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion
        if isinstance(prompt, str) or isinstance(completion, str):
            raise ValueError("prompt and completion must both be strings or both be message lists")
        prompt_msgs, completion_msgs = check_messages(prompt, "prompt"), check_messages(completion, "completion")
    return _apply(prompt_msgs, completion_msgs, tokenizer, chat_template, record.get("tools"))


def _apply(prompt_msgs, completion_msgs, tokenizer, chat_template, tools=None) -> tuple[str, str]:
    from trl.data_utils import apply_chat_template
    kwargs = {"chat_template": chat_template} if chat_template else {}
    if not prompt_msgs:
        raise ValueError("an assistant turn needs a turn before it (a conversation cannot open with the assistant)")
    out = template_call(apply_chat_template, {"prompt": prompt_msgs, "completion": completion_msgs}, tokenizer,
                        tools=tools or None, **kwargs)
    return out["prompt"], out["completion"]


def fitted_render(record: dict, tokenizer, chat_template: str | None, max_length: int,
                  report: TruncationReport) -> tuple[str, str]:
    """``render(record)``, its prompt conversation losing its oldest turns whole (system turns and
    the last user turn stay, counted in ``report``) when prompt and completion would pass
    ``max_length``; a text prompt, or one still too long, is cut by tokens later (``tokenize_pair``)."""
    p, c = render(record, tokenizer, chat_template)
    sp = specials(tokenizer)

    def fits(pair) -> bool:
        c_ids, ended = sp.cut_at_stop(encode(tokenizer, pair[1], bos=False))
        return len(encode(tokenizer, pair[0], bos=True)) + len(c_ids) + (not ended) <= max_length

    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt, completion = msgs[:last], msgs[last:last + 1]
    else:
        prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, list) or fits((p, c)):
        return p, c

    def rendered(msgs):
        return render({"prompt": msgs, "completion": completion, "tools": record.get("tools")}, tokenizer,
                      chat_template)

    kept, dropped = drop_oldest_turns(prompt, lambda msgs: fits(rendered(msgs)))
    report.prompt_turns_dropped += dropped
    return rendered(kept) if dropped else (p, c)


def assistant_turns(record: dict, tokenizer, chat_template: str | None = None) -> list[tuple[str, str]]:
    """(prompt text, completion text) of every assistant turn of a ``messages`` record, each
    rendered with the conversation before it as its prompt."""
    msgs = check_messages(record["messages"], "messages")
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not idx:
        raise ValueError("a 'messages' record needs at least one assistant turn")
    return [_apply(msgs[:i], msgs[i:i + 1], tokenizer, chat_template, record.get("tools")) for i in idx]


def response_text(completion: str, tokenizer) -> str:
    """``completion`` up to and including its first stop token (as text): the assistant's turn
    without what the template writes after its end (a newline, Phi-3's closing EOS)."""
    sp = specials(tokenizer)
    cut = len(completion)
    for t in sp.stop_ids:
        s = tokenizer.convert_ids_to_tokens(t)
        i = completion.find(s) if s else -1
        if 0 <= i and i + len(s) < cut:
            cut = i + len(s)
    return completion[:cut]


def tokenize_conversation(turns: list[tuple[str, str]], tokenizer, max_length: int,
                          report: TruncationReport | None = None) -> tuple[list[int], list[int]] | None:
    """One sequence training every assistant turn: the first turn's prompt (BOS first), then per
    turn its completion (up to its stop token, else + EOS: labelled) and what the template writes
    until the next assistant turn starts (not labelled). Each piece is tokenized on its own, as the
    policy sees a conversation (its own tokens, then the template's). Turns that would pass
    ``max_length`` are dropped whole (counted); the first is truncated as a single pair is. None when
    the template does not render the conversation as a growing prefix (it re-renders earlier turns,
    e.g. dropping their reasoning): the caller then makes one example per turn."""
    heads = [response_text(c, tokenizer) for _, c in turns]
    for (p, _), h, (p_next, _) in zip(turns, heads, turns[1:]):
        if not p_next.startswith(p + h):
            return None
    rep = report or TruncationReport()
    sp = specials(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for j, (p, c) in enumerate(turns):
        if j == 0:
            p_ids, c_ids = tokenize_pair(p, c, tokenizer, max_length, rep)
            ids, labels = list(p_ids), [IGNORE] * len(p_ids)
        else:
            c_ids, ended = sp.cut_at_stop(encode(tokenizer, c, bos=False))
            c_ids = c_ids if ended else c_ids + [sp.end_id]
            if len(ids) + len(c_ids) > max_length:
                rep.turns_dropped += len(turns) - j
                break
        ids += c_ids
        labels += c_ids
        if j + 1 < len(turns):   # the template's tokens up to the next assistant turn: context
            gap = turns[j + 1][0][len(p) + len(heads[j]):]
            between = encode(tokenizer, gap, bos=False) if gap else []
            if len(ids) + len(between) >= max_length:
                rep.turns_dropped += len(turns) - j - 1
                break
            ids += between
            labels += [IGNORE] * len(between)
    return ids, labels


def prompt_text(prompt, tokenizer, chat_template: str | None = None, tools=None) -> str:
    """The text a policy continues: a string prompt as it is; a conversation (ending with a user
    or tool turn) rendered by the chat template with the assistant's next turn opened."""
    if isinstance(prompt, str):
        return prompt
    check_messages(prompt, "prompt", prompt=True)
    return _apply(prompt, [{"role": "assistant", "content": ""}], tokenizer, chat_template, tools)[0]


def prompt_of(record: dict) -> tuple[object, str]:
    """A prompt record's prompt and the field it is in: ``prompt`` (text or a conversation), or
    ``messages`` (a conversation ending with a user turn, whose next assistant turn is sampled)."""
    if "prompt" in record:
        return record["prompt"], "prompt"
    if "messages" in record:
        return check_messages(record["messages"], "messages", prompt=True), "messages"
    raise ValueError("missing field 'prompt' (or 'messages': a conversation ending with a user turn)")


def encode_prompt(prompt, tokenizer, chat_template: str | None = None, max_length: int = 0,
                  tools=None) -> tuple[str, list[int], int]:
    """(text, ids, messages dropped) of one prompt (``prompt_text``, BOS first). Past ``max_length``
    a conversation loses its oldest turns whole (its system turns and last user turn stay,
    ``align.data.chat.drop_oldest_turns``); what is still too long keeps its last tokens, the BOS
    in front."""
    sp = specials(tokenizer)
    dropped = 0
    if max_length and isinstance(prompt, list):
        prompt, dropped = drop_oldest_turns(prompt, lambda msgs: len(encode(
            tokenizer, prompt_text(msgs, tokenizer, chat_template, tools), bos=True)) <= max_length)
    text = prompt_text(prompt, tokenizer, chat_template, tools)
    ids = encode(tokenizer, text, bos=True)
    if max_length and len(ids) > max_length:  # keep the end, and the BOS in front
        ids = sp.with_bos(ids[-(max_length - len(sp.bos_ids)):])
    return text, ids, dropped


def encode_prompts(records: list[dict], where: str, tokenizer, chat_template: str | None = None,
                   max_length: int = 0) -> list[dict]:
    """``{"text", "ids", "columns"}`` per record's prompt (``prompt_of``, ``encode_prompt``: a long
    conversation loses its oldest turns whole first, then tokens from the left); ``columns`` holds
    the record's other fields (a reference ``answer``, ``metadata``...), which programmatic rewards
    and gold scorers receive as keyword arguments (``align.scoring.call_scorer``). A record
    without a prompt, or a conversation not ending with a user turn, fails naming ``where``, the
    record and the field."""
    out = []
    for i, r in enumerate(records, 1):
        try:
            prompt, key = prompt_of(r)
            text, ids, _ = encode_prompt(prompt, tokenizer, chat_template, max_length, r.get("tools"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where_of(r, f'{where}: record {i}')}: {e}") from None
        out.append({"text": text, "ids": ids, "columns": {k: v for k, v in r.items() if k != key}})
    return out


def tokenize_pair(prompt: str, completion: str, tokenizer, max_length: int,
                  report: TruncationReport | None = None, add_eos: bool = True):
    """Token ids of prompt (BOS first) and completion (up to its first stop token, else + EOS),
    truncated to ``max_length`` in total."""
    sp = specials(tokenizer)
    p = encode(tokenizer, prompt, bos=True)
    c = encode(tokenizer, completion, bos=False)
    if add_eos:
        c, ended = sp.cut_at_stop(c)
        if not ended:
            c = c + [sp.end_id]
    rep = report or TruncationReport()
    rep.examples += 1
    if len(p) + len(c) > max_length:
        keep_prompt = max(1, max_length - len(c))
        if keep_prompt < len(p):
            nb = len(sp.bos_ids)  # cut from the left, but keep the BOS in front
            p = list(sp.bos_ids) + p[-(keep_prompt - nb):] if nb and keep_prompt > nb else p[-keep_prompt:]
            rep.prompt_truncated += 1
        if len(p) + len(c) > max_length:
            c = c[:max_length - len(p)]
            rep.completion_truncated += 1
            if not c:
                rep.dropped += 1
    return p, c


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]


def build_examples(records, tokenizer, max_length: int, completion_only: bool = True,
                   chat_template: str | None = None, where: str = "data",
                   turns: str = "all") -> tuple[list, TruncationReport]:
    """SFT examples of records; ``turns``: "all" trains every assistant turn of a ``messages``
    record (one sequence, or one example per turn when the template re-renders earlier turns),
    "last" only its last one. Where the chat template marks the assistant's text with
    ``{% generation %}``, a conversation's labels are the template's own assistant mask
    (align/data/chat.py); elsewhere the conversation is rendered turn by turn. A record that
    cannot be rendered fails naming ``where``, the record and the field."""
    report = TruncationReport()
    marks = turns == "all" and has_generation_marks(tokenizer, chat_template)
    out = []
    for i, rec in enumerate(records, 1):
        try:
            seqs, pairs = _record_examples(rec, tokenizer, max_length, chat_template, turns, marks, report)
        except (KeyError, ValueError, TypeError) as e:
            msg = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where_of(rec, f'{where}: record {i}')}: {msg}") from None
        for ids, labels in seqs:
            if any(x != IGNORE for x in labels):
                out.append(SFTExample(ids, list(ids) if not completion_only else labels))
        for prompt, completion in pairs:
            p, c = tokenize_pair(prompt, completion, tokenizer, max_length, report)
            if not c:
                continue
            labels = ([IGNORE] * len(p) if completion_only else list(p)) + c
            out.append(SFTExample(p + c, labels))
    return out, report


def _record_examples(rec, tokenizer, max_length, chat_template, turns, marks, report):
    """(whole labelled sequences, (prompt, completion) pairs still to tokenize) of one record."""
    if not isinstance(rec, dict) or not ({"messages", "prompt"} & set(rec)):
        raise ValueError("a record needs 'messages', or 'prompt' and 'completion'")
    if turns != "all" or "messages" not in rec:
        return [], [fitted_render(rec, tokenizer, chat_template, max_length, report)]
    if marks:
        if not any(m["role"] == "assistant" for m in check_messages(rec["messages"], "messages")):
            raise ValueError("a 'messages' record needs at least one assistant turn")
        seq = marked_conversation(rec, tokenizer, chat_template, max_length, report)
        if seq is not None:
            return [seq], []
    conv = assistant_turns(rec, tokenizer, chat_template)
    if len(conv) > 1:
        seq = tokenize_conversation(conv, tokenizer, max_length, report)
        if seq is not None:
            return [seq], []
        report.conversations_split += 1
    return [], conv


def pack(examples: list[SFTExample], max_length: int) -> list[dict]:
    """Greedy packing into rows of at most ``max_length`` tokens with segment ids (no
    cross-example attention: the model masks across segments and restarts positions). Each
    segment's first label is ignored: in a row it would be the target of the previous example's
    last token (a cross-example loss term, e.g. with ``completion_only_loss=false``); alone it is
    never a target either, so a packed row counts exactly the tokens its examples count alone."""
    rows, cur = [], {"input_ids": [], "labels": [], "segment_ids": []}
    seg = 0
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex.input_ids) > max_length:
            rows.append(cur)
            cur, seg = {"input_ids": [], "labels": [], "segment_ids": []}, 0
        seg += 1
        cur["input_ids"] += ex.input_ids
        cur["labels"] += [IGNORE] * min(1, len(ex.labels)) + list(ex.labels[1:])
        cur["segment_ids"] += [seg] * len(ex.input_ids)
    if cur["input_ids"]:
        rows.append(cur)
    return rows


@dataclass
class Collator:
    pad_token_id: int
    packed: bool = False
    extra: dict = field(default_factory=dict)

    def __call__(self, items) -> dict:
        items = [it if isinstance(it, dict) else {"input_ids": it.input_ids, "labels": it.labels}
                 for it in items]
        t = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), t), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), t), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), t), dtype=torch.long)
        seg = torch.zeros((len(items), t), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            labels[i, :n] = torch.tensor(it["labels"])
            mask[i, :n] = 1
            seg[i, :n] = torch.tensor(it["segment_ids"]) if "segment_ids" in it else 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.packed:
            batch["segment_ids"] = seg
        return batch
