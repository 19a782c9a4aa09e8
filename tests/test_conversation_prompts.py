"""Multi-turn prompts for the policy (PPO, GRPO, RLOO), reward and DPO stages: a prompt may be a
conversation ending with a user turn (in ``prompt`` or ``messages``), its completions the next
assistant turn. The BOS is written once, the system turn and the last user turn stay, and a prompt
too long for the budget loses its oldest turns whole before tokens are cut from the left. OASST
rankings on follow-up messages are such prompts."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from align.data.common import load_preference_splits
from align.data.preferences import Group, to_group, tokenize_group, tokenize_train_and_eval
from align.data.records import Record
from align.data.sft import TruncationReport, encode_prompts
from align.tokens import encode, specials
from tests.chat_families import family_tokenizer

SYSTEM = {"role": "system", "content": "You are a gardener."}
U1 = {"role": "user", "content": "When do I sow beans outdoors in a cold spring with late frosts?"}
A1 = {"role": "assistant", "content": "After the last frost, when the soil is warm enough to hold a seed."}
U2 = {"role": "user", "content": "And peas?"}
A2 = {"role": "assistant", "content": "Earlier: peas stand light frost."}
U3 = {"role": "user", "content": "How deep?"}
CONV = [SYSTEM, U1, A1, U2, A2, U3]


@pytest.fixture(scope="module")
def tok(tiny_llama, tmp_path_factory):
    return family_tokenizer(tiny_llama, "llama3", tmp_path_factory.mktemp("llama3") / "tok")


def ids_of(tok, msgs):
    return encode(tok, tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), bos=True)


def test_a_policy_prompt_may_be_a_conversation_ending_with_a_user_turn(tok):
    a, b = encode_prompts([Record({"messages": CONV, "answer": "2 cm"}, "p.jsonl: line 1"),
                           Record({"prompt": CONV}, "p.jsonl: line 2")], "p.jsonl", tok)
    want = tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    assert a["text"] == b["text"] == want and want.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert a["ids"] == b["ids"] == ids_of(tok, CONV)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert specials(tok).bos_ids == (bos,) and a["ids"][0] == bos and a["ids"].count(bos) == 1
    assert a["columns"] == {"answer": "2 cm"} and b["columns"] == {}


@pytest.mark.parametrize("rec, msg", [
    ({"messages": CONV + [A2]}, "field 'messages': a prompt conversation ends with a user .* last turn is 'assistant'"),
    ({"prompt": [SYSTEM]}, "field 'prompt': a prompt conversation ends with a user .* last turn is 'system'"),
    ({"messages": [{"role": "user"}]}, r"field 'messages': message 0 \(user\) has no 'content'"),
    ({"answer": "x"}, "missing field 'prompt' \\(or 'messages'"),
])
def test_a_prompt_that_is_no_conversation_to_continue_is_refused_naming_the_field(tok, rec, msg):
    with pytest.raises(ValueError, match="p.jsonl: line 4: " + msg):
        encode_prompts([Record(rec, "p.jsonl: line 4")], "p.jsonl", tok)


def test_a_long_conversation_prompt_loses_its_oldest_turns_whole(tok):
    keep_two = [SYSTEM, U2, A2, U3]
    n = len(ids_of(tok, keep_two))
    assert n < len(ids_of(tok, CONV))
    (p,) = encode_prompts([{"messages": CONV}], "p", tok, max_length=n)
    assert p["ids"] == ids_of(tok, keep_two) and p["text"].startswith("<|begin_of_text|><|start_header_id|>system")
    (p,) = encode_prompts([{"messages": CONV}], "p", tok, max_length=n - 1)   # the system and last user turn
    assert p["ids"] == ids_of(tok, [SYSTEM, U3])
    # not even those fit: the last tokens are kept, BOS in front
    (p,) = encode_prompts([{"messages": CONV}], "p", tok, max_length=8)
    full = ids_of(tok, [SYSTEM, U3])
    assert len(p["ids"]) == 8 and p["ids"][0] == full[0] and p["ids"][1:] == full[-7:]


def test_the_policy_stages_read_conversation_prompts_from_their_files(tok, tmp_path):
    from align.stages.online import load_prompts
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"prompt": "Plain text."}) + "\n")
    data = SimpleNamespace(prompts=str(f), eval_prompts=str(f), chat=False, eval_fraction=0.0, chat_template="",
                           max_prompt_length=256)
    train, held = load_prompts(SimpleNamespace(data=data), tok)
    assert [p["ids"] for p in train] == [ids_of(tok, CONV), encode(tok, "Plain text.", bos=True)]
    f.write_text(json.dumps({"messages": CONV[:3]}) + "\n")
    with pytest.raises(ValueError, match=f"{f}: line 1: field 'messages': a prompt conversation ends"):
        load_prompts(SimpleNamespace(data=data), tok)


def test_preference_prompts_keep_whole_turns_and_the_completion(tok):
    g = to_group(Record({"messages": CONV, "chosen": "Two centimetres.", "rejected": "Deep."}, "r.jsonl: line 1"),
                 "r.jsonl: line 1")
    assert g.prompt == CONV and g.completions == ["Two centimetres.", "Deep."]
    full = tokenize_group(g, tok, 512)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert [s[len(ids_of(tok, CONV)):] for s in full.sequences] == [
        encode(tok, c, bos=False) + [eot] for c in g.completions]
    kept = tokenize_group(Group([SYSTEM, U2, A2, U3], g.completions, [0, 1]), tok, 512)
    rep = TruncationReport()
    cut = tokenize_group(g, tok, max(len(s) for s in kept.sequences), report=rep)
    assert cut.sequences == kept.sequences and cut.prompt_lengths == kept.prompt_lengths
    assert rep.prompt_turns_dropped == 2 and rep.prompt_truncated == 0 and rep.completion_truncated == 0
    with pytest.raises(ValueError, match="r.jsonl: line 1: field 'prompt': a prompt conversation ends with"):
        to_group({"prompt": CONV[:3], "chosen": "a", "rejected": "b"}, "r.jsonl: line 1")


def test_reward_and_dpo_data_read_conversation_prompts_and_report_dropped_turns(tok, tmp_path):
    f = tmp_path / "prefs.jsonl"
    rows = [{"prompt": CONV, "completions": ["Two centimetres.", "Deep.", "No idea."], "ranks": [0, 1, 2]},
            {"messages": [U1], "chosen": "After the frost.", "rejected": "Now."}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    longest = max(len(encode(tok, c, bos=False)) + 1 for c in rows[0]["completions"])
    data = SimpleNamespace(train=str(f), eval="", eval_fraction=0.0, chat=False, ties="skip", chat_template="",
                           max_length=len(ids_of(tok, [SYSTEM, U3])) + longest)
    groups, eval_groups, has_eval = load_preference_splits(data)
    logged = []
    tg, _, trunc = tokenize_train_and_eval(groups, eval_groups, tok, data, logged.append, "reward")
    assert len(tg) == 2 and not has_eval
    assert all(s[:len(ids_of(tok, [SYSTEM, U3]))] == ids_of(tok, [SYSTEM, U3]) for s in tg[0].sequences)
    assert trunc["train"]["prompt_turns_dropped"] == 4 and "prompt_turns_dropped" in logged[0]


def test_oasst_rankings_of_follow_up_replies_are_multi_turn_prompts(tmp_path, tok):
    from tests.test_data_tools_sources import A, U, by_kind, imp

    def m(mid, role, text, rank=None, replies=()):
        return {"message_id": mid, "text": text, "role": role, "rank": rank, "lang": "en", "replies": list(replies)}
    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": m(
        "t1", "prompter", "When do I sow beans?", replies=[m("a1", "assistant", "After the last frost.", 0, [
            m("p2", "prompter", "How deep?", replies=[m("b1", "assistant", "About 5 cm.", 0),
                                                     m("b2", "assistant", "Deep.", 1)])])])}
    f = tmp_path / "trees.jsonl"
    f.write_text(json.dumps(tree) + "\n")
    (rank,) = by_kind(imp(tmp_path, "oasst", f), "ranking")
    assert rank["prompt"] == [U("When do I sow beans?"), A("After the last frost."), U("How deep?")]
    assert rank["completions"] == [[A("About 5 cm.")], [A("Deep.")]] and rank["ranks"] == [0, 1]
    g = tokenize_group(to_group(rank, "oasst"), tok, 512)
    text = tok.decode(g.sequences[0])
    assert text == tok.apply_chat_template(rank["prompt"] + rank["completions"][0], tokenize=False)


def test_eval_and_generate_read_conversation_prompts_too(tok, tmp_path):
    from align.evaluate import held_out_prompts, in_context_prompts
    from align.generate import read_prompts
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps({"messages": CONV, "answer": "2 cm"}) + "\n" + json.dumps({"prompt": "Plain."}) + "\n")
    cfg = SimpleNamespace(prompts=str(f), chat=False, num_prompts=8, chat_template="", demonstrations="", seed=0)
    plain = held_out_prompts(cfg, tok)
    assert [p["shown"] for p in plain] == ["How deep?", "Plain."] and plain[0]["ids"] == ids_of(tok, CONV)
    assert [p["ids"] for p in in_context_prompts(cfg, tok, 0, plain)] == [p["ids"] for p in plain]
    assert read_prompts(SimpleNamespace(prompt=[], prompts=str(f))) == [CONV, "Plain."]
    f.write_text(json.dumps({"messages": CONV[:3]}) + "\n")
    with pytest.raises(ValueError, match=f"{f}: record 1: field 'messages': a prompt conversation ends"):
        read_prompts(SimpleNamespace(prompt=[], prompts=str(f)))
    with pytest.raises(ValueError, match=f"{f}: line 1: field 'messages': a prompt conversation ends"):
        in_context_prompts(cfg, tok, 0, [])


def test_a_prompt_conversations_split_side_is_decided_by_all_its_turns():
    from align.data.common import prompt_key
    a, b = {"messages": [U1, A1, U2]}, {"messages": [U1, A1, U3]}
    assert prompt_key(a) != prompt_key(b) and prompt_key(a) == prompt_key({"prompt": [U1, A1, U2]})
    # a demonstration's prompt is the turns before its last
    assert prompt_key({"messages": [U1, A1]}) == prompt_key({"prompt": [U1]})


@pytest.mark.parametrize("shape", ["messages", "prompt"])
def test_sft_pairs_with_a_long_conversation_prompt_lose_its_oldest_turns_whole(tok, shape):
    from align.data.sft import build_examples
    a3 = {"role": "assistant", "content": "Two centimetres."}

    def rec(prompt):
        return {"messages": prompt + [a3]} if shape == "messages" else {"prompt": prompt, "completion": [a3]}
    (kept,), _ = build_examples([rec([SYSTEM, U2, A2, U3])], tok, 512, turns="last")
    (ex,), rep = build_examples([rec(CONV)], tok, len(kept.input_ids), turns="last")
    assert ex.input_ids == kept.input_ids and ex.labels == kept.labels
    assert rep.prompt_turns_dropped == 2 and rep.prompt_truncated == 0
    (ex,), rep = build_examples([rec(CONV)], tok, 512, turns="last")           # it fits: nothing dropped
    assert len(ex.input_ids) > len(kept.input_ids) and rep.prompt_turns_dropped == 0
