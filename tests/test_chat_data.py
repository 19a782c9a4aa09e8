"""``data.chat``: plain-text records (what annotation tools export) rendered as chat turns, so a chat
model is trained, rewarded and sampled on its template. Before it, plain-text rankings imported for
a chat model were tokenized without the template while the policy's prompts went through it."""
from __future__ import annotations

import json

import pytest

from align.backbone import load_tokenizer
from align.data.common import as_chat, read_records
from align.data.preferences import to_group, tokenize_group
from align.data.sft import build_examples, encode_prompts
from align.demo.tiny import make_tiny
from tests.test_real_tokenizers import _retokenize


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    path = _retokenize(make_tiny(tmp_path_factory.mktemp("chatml"), "llama", kv_heads=2), pad_is_eos=True, chatml=True)
    return load_tokenizer(path)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_as_chat_turns_every_plain_text_field_into_a_turn_and_leaves_messages_alone():
    rec = {"prompt": "Where?", "completions": ["In the shed.", [{"role": "assistant", "content": "x"}]],
           "chosen": "a", "rejected": "b", "completion": "c", "ranks": [0, 1], "meta": {"k": 1}}
    out = as_chat(rec)
    assert out["prompt"] == [{"role": "user", "content": "Where?"}]
    assert out["completions"] == [[{"role": "assistant", "content": "In the shed."}],
                                  [{"role": "assistant", "content": "x"}]]
    assert [out[k] for k in ("chosen", "rejected", "completion")] == [
        [{"role": "assistant", "content": t}] for t in ("a", "b", "c")]
    assert out["ranks"] == [0, 1] and out["meta"] == {"k": 1}
    assert rec["prompt"] == "Where?"  # the input is not modified
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert as_chat(msgs) == msgs


def test_plain_rankings_read_with_chat_tokenize_as_the_conversation_would(chat_tok, tmp_path):
    plain = {"prompt": "Where is the ladder?", "completions": ["In the shed.", "I do not know."], "ranks": [0, 1]}
    f = _write(tmp_path / "r.jsonl", [plain])
    (chat_rec,) = read_records(f, chat=True)
    (raw_rec,) = read_records(f)
    as_messages = {"prompt": [{"role": "user", "content": plain["prompt"]}],
                   "completions": [[{"role": "assistant", "content": c}] for c in plain["completions"]],
                   "ranks": [0, 1]}
    chat = tokenize_group(to_group(chat_rec, "r"), chat_tok, 256)
    ref = tokenize_group(to_group(as_messages, "m"), chat_tok, 256)
    raw = tokenize_group(to_group(raw_rec, "r"), chat_tok, 256)
    assert chat.sequences == ref.sequences
    start = chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert all(start in s for s in chat.sequences) and not any(start in s for s in raw.sequences)


def test_plain_sft_records_and_prompts_with_chat_go_through_the_template(chat_tok, tmp_path):
    f = _write(tmp_path / "s.jsonl", [{"prompt": "Say hi.", "completion": "Hi."}])
    (ex,), _ = build_examples(read_records(f, chat=True), chat_tok, 256)
    (ref,), _ = build_examples([{"messages": [{"role": "user", "content": "Say hi."},
                                              {"role": "assistant", "content": "Hi."}]}], chat_tok, 256)
    assert ex.input_ids == ref.input_ids and ex.labels == ref.labels
    (p,) = encode_prompts(read_records(_write(tmp_path / "p.jsonl", [{"prompt": "Say hi."}]), chat=True),
                          "p", chat_tok)
    assert p["text"].startswith("<|im_start|>user\nSay hi.<|im_end|>") and p["text"].endswith("<|im_start|>assistant\n")
