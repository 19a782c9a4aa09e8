"""SFT on conversations under the real chat templates of the ChatML, Llama-3, Gemma and Phi-3
families (tests/fixtures/chat_templates/): the loss falls on every assistant turn's content and its
end-of-turn token and on nothing else (no system, user or tool text, no template markup); the
rest of the sequence is exactly what the template renders. Templates with ``{% generation %}``
markers give their own assistant mask, which align uses and which agrees with its turn-by-turn
rendering; tool calls and tool results pass through the template unchanged."""
from __future__ import annotations

import pytest

from align.data.records import Record
from align.data.sft import IGNORE, build_examples
from align.tokens import encode, specials
from tests.chat_families import FAMILIES, SYSTEM, TURNS, family_tokenizer, spans, template



def conversation(family: str) -> list[dict]:
    return TURNS if family == "gemma" else [SYSTEM] + TURNS   # Gemma's template refuses a system turn


@pytest.fixture(scope="module")
def tokenizers(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    toks = {f: family_tokenizer(tiny_llama, f, root / f) for f in FAMILIES}
    for f in ("chatml", "llama3"):
        toks[f + "_generation"] = family_tokenizer(tiny_llama, f, root / f"{f}_g", template(f + "_generation"))
    toks["tools"] = family_tokenizer(tiny_llama, "chatml", root / "tools", template("qwen2_5_tools"))
    return toks


def rendered_until_last_end(tok, msgs, end: str, **kw) -> str:
    text = tok.apply_chat_template(msgs, tokenize=False, **kw)
    return text[:text.rindex(end) + len(end)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_template_trains_every_assistant_turn_with_its_end_of_turn_and_nothing_else(tokenizers, family):
    tok = tokenizers[family]
    msgs = conversation(family)
    end = FAMILIES[family][3]
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id in specials(tok).stop_ids
    (ex,), rep = build_examples([{"messages": msgs}], tok, 512)
    want = [encode(tok, m["content"], bos=False) + [end_id] for m in msgs if m["role"] == "assistant"]
    assert spans(ex) == want                                   # content + end of turn, per turn, nothing else
    assert sum(lab != IGNORE for lab in ex.labels) == sum(map(len, want))
    # everything else is the template's own rendering (system and user text, markup), up to the last end
    assert tok.decode(ex.input_ids) == rendered_until_last_end(tok, msgs, end)
    bos = specials(tok).bos_ids
    assert list(ex.input_ids[:len(bos)]) == list(bos) and (not bos or ex.input_ids.count(bos[0]) == 1)
    assert rep.conversations_split == 0 and rep.turns_dropped == 0 and rep.examples == 1


def test_phi3s_closing_eos_is_neither_trained_nor_a_reason_to_split(tokenizers):
    """Phi-3's template writes its EOS after the last turn only, so a conversation rendered turn by
    turn is no growing prefix if that EOS counts as part of a turn: it is what follows the turn's
    end (<|end|>), like ChatML's newline, and the conversation stays one sequence."""
    tok = tokenizers["phi3"]
    (ex,), rep = build_examples([{"messages": conversation("phi3")}], tok, 512)
    assert rep.conversations_split == 0
    assert tok.eos_token_id not in ex.input_ids and tok.decode(ex.input_ids).endswith("You are welcome.<|end|>")


def test_gemma_refusing_a_system_turn_is_an_error_naming_the_record(tokenizers):
    rec = Record({"messages": [SYSTEM] + TURNS}, "chats.jsonl: line 3")
    with pytest.raises(ValueError, match=r"chats.jsonl: line 3: the chat template refused the conversation: "
                                         r"System role not supported"):
        build_examples([rec], tokenizers["gemma"], 512)


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_generation_mask_and_turn_by_turn_rendering_agree(tokenizers, family):
    plain, marked = tokenizers[family], tokenizers[family + "_generation"]
    msgs = conversation(family)
    (a,), ra = build_examples([{"messages": msgs}], plain, 512)
    (b,), rb = build_examples([{"messages": msgs}], marked, 512)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert len(spans(b)) == 3 and ra.as_dict() == rb.as_dict()
    # and the mask align read is transformers' own: every labelled token is one it marks
    out = marked.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    off = len(b.input_ids) - len(out["input_ids"][:len(b.input_ids)])
    marked_ids = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert off >= 0 and [t for s in spans(b) for t in s] == marked_ids


def test_the_templates_mask_decides_what_is_trained(tokenizers):
    """A template that marks only the last assistant turn: align trains only that turn (the mask,
    not the turn-by-turn rendering, is used where the template has one)."""
    body = "{{ message['content'] + '<|im_end|>' }}"
    tpl = template("chatml_generation").replace(
        "{% generation %}" + body + "{% endgeneration %}",
        "{% if loop.last %}{% generation %}" + body + "{% endgeneration %}{% else %}" + body + "{% endif %}")
    assert tpl.count("{% generation %}") == 1 and "loop.last" in tpl
    tok = tokenizers["chatml_generation"]
    msgs = conversation("chatml")
    (ex,), _ = build_examples([{"messages": msgs}], tok, 512, chat_template=tpl)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert spans(ex) == [encode(tok, "You are welcome.", bos=False) + [end]]
    assert tok.decode(ex.input_ids) == rendered_until_last_end(tok, msgs, "<|im_end|>", chat_template=tpl)


def test_generation_mask_drops_turns_past_max_length_whole(tokenizers):
    tok = tokenizers["llama3_generation"]
    msgs = conversation("llama3")
    (full,), _ = build_examples([{"messages": msgs}], tok, 512)
    second = spans(full)[1]
    start = next(i for i in range(len(full.input_ids)) if full.input_ids[i:i + len(second)] == second)
    (ex,), rep = build_examples([{"messages": msgs}], tok, start + len(second) + 3)
    assert spans(ex) == spans(full)[:2] and rep.turns_dropped == 1
    assert ex.input_ids == full.input_ids[:start + len(second)]
    # not even the first turn fits: the prompt is cut from the left as for a single turn
    (ex,), rep = build_examples([{"messages": msgs}], tok, 24)
    assert len(ex.input_ids) <= 24 and spans(ex)[0] == spans(full)[0] and rep.prompt_truncated == 1


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONV = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "How warm is Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"celsius\": 18}"},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
]


def test_tool_calls_are_trained_as_the_assistants_and_tool_results_are_context(tokenizers):
    tok = tokenizers["tools"]
    (ex,), rep = build_examples([{"messages": TOOL_CONV, "tools": TOOLS}], tok, 1024)
    got = [tok.decode(s) for s in spans(ex)]
    assert got == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                   "It is 18 degrees in Paris.<|im_end|>"]
    # the conversation is the template's rendering, tools schema and tool result included, untouched
    text = tok.decode(ex.input_ids)
    assert text == rendered_until_last_end(tok, TOOL_CONV, "<|im_end|>", tools=TOOLS)
    assert '"name": "get_weather", "description": "The weather in a city."' in text
    assert "<|im_start|>user\n<tool_response>\n{\"celsius\": 18}\n</tool_response><|im_end|>" in text
    assert rep.conversations_split == 0
    # without the record's tools, the template writes its default system turn instead
    (bare,), _ = build_examples([{"messages": TOOL_CONV}], tok, 1024)
    assert "# Tools" in text and "# Tools" not in tok.decode(bare.input_ids)


@pytest.mark.parametrize("bad, field", [
    ({"role": "user", "content": "x", "tool_calls": []}, "message 1: 'tool_calls' must be a list on an assistant message"),
    ({"role": "assistant"}, r"message 1 \(assistant\) has no 'content'"),
    ({"role": "robot", "content": "x"}, "message 1 has role 'robot'"),
    ({"role": "user", "content": 3}, "message 1: 'content' must be text"),
])
def test_malformed_messages_name_the_file_record_and_field(tokenizers, bad, field):
    rec = Record({"messages": [{"role": "user", "content": "hi"}, bad]}, "chats.jsonl: line 7")
    with pytest.raises(ValueError, match=rf"chats.jsonl: line 7: field 'messages': {field}"):
        build_examples([rec], tokenizers["chatml"], 512)


def test_the_rendered_examples_in_docs_data_md_and_the_readme_are_what_align_preview_prints(tokenizers):
    import re
    from pathlib import Path

    from align.preview import marked
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    shown = dict(re.findall(r"<!-- example: (\w+) -->\n```text\n(.*?)\n```", doc, re.S))
    assert set(shown) == set(FAMILIES)
    msgs = [SYSTEM, *TURNS[:3], {"role": "assistant", "content": "Green."}]
    for family, text in shown.items():
        tok = tokenizers[family]
        (ex,), _ = build_examples([{"messages": msgs[1:] if family == "gemma" else msgs}], tok, 512)
        assert marked(tok, ex.input_ids, ex.labels, IGNORE) == text, family
    (ex,), _ = build_examples([{"messages": TOOL_CONV, "tools": TOOLS}], tokenizers["tools"], 1024)
    tools_shown = re.search(r"```text\n\.\.\.(.*?)\n```", doc, re.S).group(1)
    assert marked(tokenizers["tools"], ex.input_ids, ex.labels, IGNORE).endswith(tools_shown)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    in_readme = dict(re.findall(r"<!-- example: (\w+) -->\n```text\n(.*?)\n```", readme, re.S))
    assert in_readme == {"chatml": shown["chatml"]}   # the README's example is the page's, as printed
