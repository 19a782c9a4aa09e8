"""The SmolLM2 pipeline's task (align/demo/tasks/short_answers.py): every generated question parses back
to its answer, held-out prompts never occur in training splits, demonstrations are correct, and the
gold cannot be gamed by empty, repeated or all-candidates text."""
from __future__ import annotations

import pytest

from align.demo.tasks import short_answers as t

CHAT = "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("split", t.SPLITS)
def test_every_question_parses_back_to_its_answer_plain_and_rendered(split):
    for q in t._questions(split, 400, seed=3):
        for text in (q["question"], CHAT.format(q=q["question"])):
            p = t.parse_question(text)
            assert p is not None and (p["kind"], p["answer"], p["distractor"]) == (q["kind"], q["answer"], q["distractor"])
    assert {q["kind"] for q in t._questions(split, 400, seed=3)} == set(t.KINDS)


def test_held_out_prompts_are_never_training_prompts_and_use_held_out_names():
    train = set()
    for split in ("sft", "rm", "ppo"):
        train |= set(t.prompts(split, 3000))
    held = t.prompts("eval", 500)
    assert not set(held) & train
    assert all(any(n in p for n in t.HELD_OUT_NAMES) for p in held)
    assert not any(n in p for p in train for n in t.HELD_OUT_NAMES)


def test_demonstrations_are_correct_and_mixed_in_length():
    demos = t.sft_demonstrations(400)
    terms = [t.gold_terms(d["prompt"], d["completion"], True) for d in demos]
    assert all(x["correct"] for x in terms)
    over = sum(x["words"] > t.MAX_WORDS for x in terms) / len(terms)
    assert 0.35 < over < 0.55  # the long-winded share is what the rankings teach against


@pytest.mark.parametrize("response,ended,expected", [
    ("In the shed.", True, 1.0),
    ("Mia keeps the ladder in the shed.", True, 1.0),
    ("In the shed.", False, 0.5),                      # cut off at the length limit
    ("In the garage.", True, 0.0),                     # the distractor
    ("garage or shed", True, 0.0),                     # every candidate: the first named counts
    ("", True, -1.0),                                  # nothing
    ("", False, -1.5),
    ("shed shed shed", True, 0.5),                     # repetition
    ("Mia keeps the ladder in the shed, which is a small wooden building in the garden behind the house.",
     True, 1.0 - 0.05 * (19 - 12)),                    # correct but long
])
def test_gold_rewards_short_correct_finished_answers_only(response, ended, expected):
    q = "Mia keeps the keys in the garage and the ladder in the shed. Where does Mia keep the ladder?"
    assert t.gold_score(CHAT.format(q=q), response, ended) == pytest.approx(expected)


def test_gold_reads_sums_and_comparisons():
    add = "Sara has 4 apples and gets 7 more. How many apples does Sara have now?"
    assert t.gold_score(add, "Sara has 11 apples now.", True) == 1.0
    assert t.gold_score(add, "4 + 7 = eleven.", True) == 1.0
    assert t.gold_score(add, "4 and 7 make 11, the other one was wrong.", True) == 1.0
    assert t.gold_score(add, "11, no wait, 12.", True) == 0.0          # a wrong number as well
    assert t.gold_score(add, "1 2 3 4 5 6 7 8 9 10 11", True) == 0.0   # listing numbers does not pay
    cmp_ = "Lena is older than Tom. Who is younger?"
    assert t.gold_score(cmp_, "Tom.", True) == 1.0
    assert t.gold_score(cmp_, "Lena is younger.", True) == 0.0
    with pytest.raises(ValueError, match="no short-answers question"):
        t.gold_score("Tell me a story.", "Once.", True)


def test_gold_summary_reports_the_ingredients():
    q = "Mia keeps the keys in the garage and the ladder in the shed. Where does Mia keep the ladder?"
    s = t.gold_summary([q] * 4, ["In the shed.", "", "shed shed shed", "In the garage."], [True, True, False, True])
    assert s == {"correct": 0.5, "ended": 0.75, "mean_words": 2.25, "over_length": 0.0, "repeats": 0.25, "empty": 0.25}
