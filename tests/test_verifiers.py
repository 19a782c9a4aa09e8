"""Built-in verifiers (align/verifiers.py) by hand, the rewards list's bare names and args, and the
short-answers task's verifier against its gold's correctness term."""
from __future__ import annotations

import functools

import pytest

from align import verifiers as V
from align.rewardmix import entry_problems, required_columns, sources_from_config
from align.scoring import call_scorer, load_callable


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert V.normalize_answer("  The Shed. ") == "shed"
    assert V.normalize_answer("An apple, a day!") == "apple day"


def test_exact_match_against_a_column_with_no_opinion_on_missing_answers():
    out = V.exact_match(["q"] * 4, ["The shed.", "garage", "Paris", "x"], [True] * 4,
                        answer=["shed", "shed", ["paris", "Paris, France"], None])
    assert out == [1.0, 0.0, 1.0, None]
    with pytest.raises(ValueError, match="lengths differ"):
        V.exact_match(["q"], ["a", "b"], [True, True], answer=["a"])


def test_last_number_reads_boxed_commas_fractions_and_signs():
    from fractions import Fraction
    assert V.last_number("so 3 + 4 = 7.") == 7
    assert V.last_number("the total is 1,234 apples") == 1234
    assert V.last_number("about -3.5 degrees") == Fraction(-7, 2)
    assert V.last_number("answer \\boxed{3/4} not 9") == Fraction(3, 4)
    assert V.last_number("no digits here") is None


@pytest.mark.parametrize("with_math_verify", [True, False])
def test_numeric_match_with_and_without_math_verify(monkeypatch, with_math_verify):
    if with_math_verify:
        pytest.importorskip("math_verify")
    else:
        monkeypatch.setattr(V, "_math_verify", lambda: None)
    out = V.numeric_match(["q"] * 5, ["It is 11.", "12", "0.5", "I do not know", "x"], [True] * 5,
                          answer=["11", "11", "1/2", "3", None])
    assert out == [1.0, 0.0, 1.0, 0.0, None]


def test_numeric_match_fallback_refuses_an_answer_it_cannot_read(monkeypatch):
    monkeypatch.setattr(V, "_math_verify", lambda: None)
    with pytest.raises(ValueError, match=r"answer '\\\\frac\{1\}\{2\}' of record 0 is not a plain number"):
        V.numeric_match(["q"], ["0.5"], [True], answer=["\\frac{1}{2}"])


def test_regex_match_and_length_penalty_by_hand():
    assert V.regex_match([""] * 3, ["Answer: 4", "4", "answer: x"], [True] * 3, pattern=r"^Answer: \d+$") == \
        [1.0, 0.0, 0.0]
    assert V.regex_match([""], ["xx Answer: 4"], [True], pattern=r"Answer", full=True) == [0.0]
    out = V.length_penalty([""] * 3, ["a b c", "a b c d e f", "a"], [True, True, False], max_words=4,
                           per_word=0.1, unended=0.5)
    assert out == pytest.approx([0.0, -0.2, -0.5])


def test_bare_names_and_args_in_a_rewards_list():
    from types import SimpleNamespace
    entries = [{"fn": "exact_match"}, {"fn": "regex_match", "args": {"pattern": "^A"}, "weight": 0.5}]
    assert entry_problems(entries, "", "", "") == []
    cfg = SimpleNamespace(rewards=entries, reward_run="", reward_fn="")
    srcs = sources_from_config(cfg)
    assert [s.name for s in srcs] == ["exact_match", "regex_match"]
    assert isinstance(srcs[1].fn, functools.partial) and required_columns(srcs[1].fn) == []
    assert required_columns(srcs[0].fn) == ["answer"]
    prompts = [{"text": "q", "columns": {"answer": "Apple"}}, {"text": "q", "columns": {"answer": "b"}}]
    assert call_scorer(srcs[1].fn, prompts, ["Apple", "b"], [True, True]) == [1.0, 0.0]
    assert load_callable("numeric_match") is V.numeric_match


@pytest.mark.parametrize("entry,match", [
    ({"fn": "regex_match", "args": {"patern": "x"}}, "has no parameter 'patern'"),
    ({"fn": "regex_match", "args": ["x"]}, "give a mapping"),
    ({"fn": "no_such_verifier"}, "give 'module:function'"),
    ({"role": "reward", "args": {"x": 1}}, "only a function takes args"),
])
def test_bad_entries_are_named(entry, match):
    problems = entry_problems([entry], "runs/rm", "", "")
    assert any(match in p for p in problems), problems


def test_short_answers_verifier_agrees_with_the_gold_correctness_term():
    from align.demo.tasks import short_answers as t
    recs = t.prompt_records("eval", 200, 3)
    assert [r["prompt"] for r in recs] == t.prompts("eval", 200, 3)
    responses = []
    for i, r in enumerate(recs):   # right, wrong (the distractor first), and sums with a stray number
        if r["kind"] == "add":
            responses.append([f"{r['answer']}.", f"{int(r['answer']) + 1}.", f"{r['answer']} or 99"][i % 3])
        else:
            responses.append([f"{r['answer']}.", f"{r['distractor']}, not {r['answer']}.", "No idea."][i % 3])
    cols = {k: [r[k] for r in recs] for k in ("answer", "distractor", "kind")}
    prompts = [r["prompt"] for r in recs]
    got = t.correct(prompts, responses, [True] * len(recs), **cols)
    want = [float(t.gold_terms(p, c, True)["correct"]) for p, c in zip(prompts, responses)]
    assert got == want and 0.2 < sum(got) / len(got) < 0.5
    assert t.correct(["x"], ["y"], [True], answer=[None], distractor=[None], kind=[None]) == [None]
