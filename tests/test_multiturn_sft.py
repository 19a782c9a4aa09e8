"""Every assistant turn of a conversation is trained (``data.train_turns=all``, as TRL's
``assistant_only_loss``): one sequence whose labels are exactly the assistant turns' tokens (each up
to its end-of-turn token), the user turns and the template's markup context; ``last`` keeps the
old behaviour; a template that re-renders earlier turns gets one example per turn; turns beyond
``max_length`` are dropped whole and counted."""
from __future__ import annotations

import pytest

from align.data.sft import TruncationReport, build_examples, render, tokenize_pair
from tests.chat_families import SYSTEM, TURNS, spans
from tests.test_chat_data import chat_tok  # noqa: F401  (the ChatML tokenizer fixture)

CONV = {"messages": [SYSTEM, *TURNS]}


def test_every_assistant_turn_is_labelled_and_nothing_else(chat_tok):  # noqa: F811
    (ex,), rep = build_examples([CONV], chat_tok, 512)
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    runs = spans(ex)
    assert [chat_tok.decode(s, skip_special_tokens=True) for s in runs] == \
        ["Blue.", "Green, and also red.", "You are welcome."]
    assert all(s[-1] == end for s in runs)                  # each turn learns to stop
    text = chat_tok.decode(ex.input_ids)
    assert text.count("<|im_start|>assistant") == 3 and "Thanks." in text and "Be brief." in text
    # the last turn's example is what the single-turn path makes: the same tokens at the end
    p, c = tokenize_pair(*render(CONV, chat_tok), chat_tok, 512)
    assert ex.input_ids[-len(c):] == c and runs[-1] == c
    assert rep.turns_dropped == 0 and rep.conversations_split == 0


def test_last_turn_only_keeps_the_earlier_behaviour(chat_tok):  # noqa: F811
    (ex,), _ = build_examples([CONV], chat_tok, 512, turns="last")
    assert [chat_tok.decode(s, skip_special_tokens=True) for s in spans(ex)] == ["You are welcome."]


def test_turns_beyond_max_length_are_dropped_whole_and_counted(chat_tok):  # noqa: F811
    (full,), _ = build_examples([CONV], chat_tok, 512)
    runs = spans(full)
    cut = full.input_ids.index(runs[1][0]) + 3               # room for turn 1 and part of turn 2
    rep = TruncationReport()
    (ex,), rep = build_examples([CONV], chat_tok, cut)
    assert len(ex.input_ids) <= cut and rep.turns_dropped == 2
    assert [chat_tok.decode(s, skip_special_tokens=True) for s in spans(ex)] == ["Blue."]


def test_a_template_that_rerenders_earlier_turns_gets_one_example_per_turn(chat_tok):  # noqa: F811
    # a template that shows only the latest user turn (as reasoning templates drop old thoughts):
    # the conversation is no growing prefix, so each assistant turn is its own example
    tpl = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{% else %}"
           "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    exs, rep = build_examples([CONV], chat_tok, 512, chat_template=tpl)
    assert rep.conversations_split == 1 and len(exs) == 3
    assert [chat_tok.decode(spans(e)[0], skip_special_tokens=True) for e in exs] == \
        ["Blue.", "Green, and also red.", "You are welcome."]


def test_completion_only_false_labels_the_whole_conversation(chat_tok):  # noqa: F811
    (ex,), _ = build_examples([CONV], chat_tok, 512, completion_only=False)
    assert ex.labels == ex.input_ids


def test_sft_stage_trains_all_turns_by_default_and_refuses_a_bad_choice(tiny_llama, tmp_path):
    from align.config import ConfigError, load_config
    from align.stages.sft import SFTConfig
    with pytest.raises(ConfigError, match="data.train_turns='first': choose one of all, last"):
        from align.config import validate
        validate(load_config(SFTConfig, None, [f"model.path={tiny_llama}", "data.train=x.jsonl",
                                               "data.train_turns=first"]))
    assert SFTConfig().data.train_turns == "all"


def test_align_preview_marks_exactly_the_trained_tokens(chat_tok, tmp_path, capsys):  # noqa: F811
    """``align preview`` prints what SFT trains: each assistant turn (with its end-of-turn token)
    between the marks, and nothing else."""
    import json

    from align.cli import main
    tok_dir = tmp_path / "tok"
    chat_tok.save_pretrained(tok_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(CONV) + "\n")
    assert main(["preview", f"model.path={tok_dir}", f"data.train={data}", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "⟦Blue.<|im_end|>⟧" in out and "⟦Green, and also red.<|im_end|>⟧" in out
    assert "⟦You are welcome.<|im_end|>⟧" in out and out.count("⟦") == 3
    assert "Thanks." in out and "data.train_turns=all" in out
    assert main(["preview", f"model.path={tok_dir}", f"data.train={data}", "data.train_turns=last"]) == 0
    assert capsys.readouterr().out.count("⟦") == 1
    assert main(["preview", f"data.train={data}"]) == 2
