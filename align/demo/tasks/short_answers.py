"""Short answers: questions answered from the facts the question itself states, where a chat model
tends to ramble. The SmolLM2 pipeline's task (configs/smollm2.yaml).

Four kinds of question, each generated from word lists with the answer known to the generator:

* where:   "Mia keeps the keys in the garage and the ladder in the shed. Where does Mia keep the
           ladder?"                                                             -> shed
* colour:  "Omar's hat is green and his scarf is grey. What colour is Omar's scarf?" -> grey
* compare: "Lena is older than Tom. Who is younger?"                           -> Tom
* add:     "Sara has 4 apples and gets 7 more. How many apples does Sara have now?" -> 11

Every question names a distractor (the other place, colour or person), so copying the first
sentence is not an answer. SmolLM2-135M-Instruct answers many of them in a sentence, but it also
explains, speculates or runs on past its length limit (the pipeline's ``response_length``).

Gold score (the hidden judgement the simulated annotator ranks by; the reward model never sees it):

    correct = 1   when the answer is the candidate the response names first (where, colour,
                  compare: the first of {answer, distractor} in the text), or (add) the response
                  names the sum and no number but the two addends and the sum (digits or number
                  words; "one" is not read as a number, it is too often a pronoun)
    gold = correct
           - 0.5  * [response did not end with the stop token]
           - 0.05 * max(0, words - 12)          # concise: a sentence is fine, a paragraph is not
           - 0.5  * [some content word three or more times]
           - 1.0  * [no words at all]

so the best answer (+1.0) is short, right and finished ("In the shed." or "Mia keeps the ladder in
the shed."). Saying nothing scores -1; listing every candidate is right only when the first
listed is; repeating a word costs; a long correct answer costs more the longer it is.

Splits: SFT, reward-model annotation and policy prompts use one set of names and things; held-out
evaluation prompts use names and things that never occur in any training split, so no evaluation
prompt is ever a training prompt. Deterministic for a seed; nothing is downloaded.
"""
from __future__ import annotations

import random
import re

VERSION = 1

NAMES = ("Mia Tom Lena Omar Sara Ben Ivy Noah Ella Leo Ruby Sam Zoe Max Nina Owen Lucy Adam Maya Jack "
         "Emma Liam Grace Ethan Chloe Lucas Alice Henry Rosa Felix").split()
HELD_OUT_NAMES = "Priya Hugo Ines Kofi Aiko Mateo Freya Tariq Selma Viktor".split()
OBJECTS = "keys ladder bicycle umbrella books lamp blanket tools kettle guitar camera boots".split()
HELD_OUT_OBJECTS = "paints drill tent violin".split()
PLACES = "garage shed kitchen attic basement hallway bedroom cellar closet study".split()
CLOTHES = "hat scarf coat shirt jacket sweater".split()
HELD_OUT_CLOTHES = "cap belt".split()
COLOURS = "red blue green yellow black white grey brown pink purple orange".split()
COMPARISONS = (("older", "younger"), ("taller", "shorter"), ("faster", "slower"))
ITEMS = "apples pencils stickers marbles cookies stamps coins shells".split()
HELD_OUT_ITEMS = "cards buttons".split()
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()
STOPWORDS = frozenset("the a an in and is was of to it her his their she he they does do keep keeps has have "
                      "than now more".split())

SPLITS = ("sft", "rm", "ppo", "eval")
# what the pipeline's report gives pass rates of, per question kind (align/demo/pipeline.py)
VERIFIERS = ({"fn": "align.demo.tasks.short_answers:correct", "name": "correct"},)
GROUP_BY = "kind"
KINDS = ("where", "colour", "compare", "add")
MAX_WORDS = 12


# ---------------------------------------------------------------------------------- questions
def _pools(held_out: bool) -> dict:
    return {"names": HELD_OUT_NAMES if held_out else NAMES, "objects": HELD_OUT_OBJECTS if held_out else OBJECTS,
            "clothes": HELD_OUT_CLOTHES if held_out else CLOTHES, "items": HELD_OUT_ITEMS if held_out else ITEMS}


def _question(rng: random.Random, held_out: bool) -> dict:
    """One question: ``{"kind", "question", "answer", "distractor", "fact"}``."""
    p = _pools(held_out)
    kind = rng.choice(KINDS)
    name = rng.choice(p["names"])
    if kind == "where":
        objs = rng.sample(p["objects"], 2)
        places = rng.sample(PLACES, 2)
        k = rng.randrange(2)
        q = (f"{name} keeps the {objs[0]} in the {places[0]} and the {objs[1]} in the {places[1]}. "
             f"Where does {name} keep the {objs[k]}?")
        return {"kind": kind, "question": q, "answer": places[k], "distractor": places[1 - k],
                "subject": f"{name} keeps the {objs[k]}", "prep": "in the "}
    if kind == "colour":
        things = rng.sample(p["clothes"], 2)
        cols = rng.sample(COLOURS, 2)
        k = rng.randrange(2)
        pron = rng.choice(("her", "his"))
        q = f"{name}'s {things[0]} is {cols[0]} and {pron} {things[1]} is {cols[1]}. What colour is {name}'s {things[k]}?"
        return {"kind": kind, "question": q, "answer": cols[k], "distractor": cols[1 - k],
                "subject": f"{name}'s {things[k]} is", "prep": ""}
    if kind == "compare":
        other = rng.choice([n for n in p["names"] if n != name])
        more, less = rng.choice(COMPARISONS)
        ask_less = rng.random() < 0.5
        q = f"{name} is {more} than {other}. Who is {less if ask_less else more}?"
        answer = other if ask_less else name
        return {"kind": kind, "question": q, "answer": answer, "distractor": name if ask_less else other,
                "subject": "", "prep": "", "adjective": less if ask_less else more}
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    item = rng.choice(p["items"])
    q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return {"kind": kind, "question": q, "answer": str(a + b), "distractor": "", "subject": f"{name} has",
            "prep": "", "item": item}


def _questions(split: str, n: int, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    rng = random.Random(f"short-answers-{split}-{seed}")
    return [_question(rng, held_out=split == "eval") for _ in range(n)]


def prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` questions of a split ("sft", "rm", "ppo", "eval"); eval questions use held-out names
    and things only (module docstring), so none is a training prompt."""
    return [q["question"] for q in _questions(split, n, seed)]


def prompt_records(split: str, n: int, seed: int = 0) -> list[dict]:
    """The questions of :func:`prompts` as prompts-file records that carry their reference:
    ``{"prompt", "answer", "distractor", "kind"}`` (``distractor`` is "" for sums). The extra fields
    reach a verifier (:func:`correct`) as keyword arguments; the learned reward never sees them."""
    return [{"prompt": q["question"], "answer": q["answer"], "distractor": q["distractor"], "kind": q["kind"]}
            for q in _questions(split, n, seed)]


# ---------------------------------------------------------------------------- demonstrations
_ELABORATIONS = (
    "It is easy to find there whenever it is needed.",
    "This is stated directly in the question, so the answer follows from it.",
    "That is the detail given for it, and the other one is a different thing.",
    "Reading the sentence again confirms this, since each part is described separately.",
    "The question gives both facts, but only one of them matches what is asked.",
)


def _answer_styles(q: dict) -> tuple[str, str]:
    """(a short answer, a one-sentence answer) to ``q``."""
    ans = q["answer"]
    if q["kind"] == "where":
        return f"In the {ans}.", f"{q['subject']} in the {ans}."
    if q["kind"] == "colour":
        return f"{ans.capitalize()}.", f"{q['subject']} {ans}."
    if q["kind"] == "compare":
        return f"{ans}.", f"{ans} is {q['adjective']}."
    return f"{ans}.", f"{q['subject']} {ans} {q['item']} now."


def correctness_pairs(split: str, n: int, seed: int = 0) -> list[dict]:
    """Preference pairs that differ only in correctness: for each of ``n`` questions, its right
    answer and the same answer with the distractor (for a sum, the sum plus or minus one), in the
    short and the one-sentence style: same length in words, both ended. ``{"prompt", "chosen",
    "rejected", "kind", "style"}``. A reward model that orders these sees correctness, not shape."""
    rng = random.Random(f"short-answers-pairs-{split}-{seed}")
    out = []
    for q in _questions(split, n, seed):
        wrong_answer = q["distractor"] or str(int(q["answer"]) + rng.choice((-1, 1)))
        wrong = dict(q, answer=wrong_answer)
        if q["kind"] == "compare":   # "Tom is younger." -> "Lena is younger."
            wrong["adjective"] = q["adjective"]
        for style, right_text, wrong_text in zip(("short", "sentence"), _answer_styles(q), _answer_styles(wrong)):
            out.append({"prompt": q["question"], "chosen": right_text, "rejected": wrong_text, "kind": q["kind"],
                        "style": style})
    return out


def sft_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """``{"prompt", "completion"}`` on "sft" questions, always correct but of mixed length, as
    demonstrations written by several people are: 30% a few words, 25% one sentence, 45% a
    sentence followed by one or two sentences of explanation (14-40 words, over the gold's length
    allowance; the longest run past the pipeline's 32-token response limit), the long-winded style
    of an instruct model. The SFT policy learns the format and the mix; which length is preferred
    is left to the rankings."""
    rng = random.Random(f"short-answers-sft-{seed}")
    out = []
    for q in _questions("sft", n, seed):
        short, sentence = _answer_styles(q)
        u = rng.random()
        if u < 0.30:
            completion = short
        elif u < 0.55:
            completion = sentence
        else:
            completion = " ".join([sentence, *rng.sample(_ELABORATIONS, rng.choice((1, 2)))])
        out.append({"prompt": q["question"], "completion": completion})
    return out


# --------------------------------------------------------------------------------- gold scorer
_WORD = re.compile(r"[A-Za-z0-9']+")
_NUMBER = re.compile(r"\b(\d+|" + "|".join(w for w in NUMBER_WORDS if w != "one") + r")\b", re.IGNORECASE)
_QUESTION_PATTERNS = (
    ("where", re.compile(r"(\w+) keeps the (\w+) in the (\w+) and the (\w+) in the (\w+)\. "
                         r"Where does \1 keep the (\w+)\?")),
    ("colour", re.compile(r"(\w+)'s (\w+) is (\w+) and (?:her|his) (\w+) is (\w+)\. What colour is \1's (\w+)\?")),
    ("compare", re.compile(r"(\w+) is (\w+) than (\w+)\. Who is (\w+)\?")),
    ("add", re.compile(r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many \3 does \1 have now\?")),
)
_COMPARE = {m: True for m, _ in COMPARISONS} | {le: False for _, le in COMPARISONS}


def parse_question(prompt: str) -> dict | None:
    """The kind, answer and distractor of the question in ``prompt`` (the plain question, or a
    chat rendering containing it); None for text that holds no question of this task."""
    for kind, pat in _QUESTION_PATTERNS:
        m = pat.search(prompt)
        if not m:
            continue
        g = m.groups()
        if kind in ("where", "colour"):  # (thing, value) twice, then the thing asked about
            if g[5] not in (g[1], g[3]):
                continue
            k = 0 if g[5] == g[1] else 1
            return {"kind": kind, "answer": (g[2], g[4])[k], "distractor": (g[2], g[4])[1 - k]}
        if kind == "compare":
            if g[1] not in _COMPARE or g[3] not in _COMPARE:
                continue
            same = _COMPARE[g[1]] == _COMPARE[g[3]]
            return {"kind": kind, "answer": g[0] if same else g[2], "distractor": g[2] if same else g[0]}
        return {"kind": kind, "answer": str(int(g[1]) + int(g[3])), "distractor": "", "addends": {g[1], g[3]}}
    return None


def _first_named(text: str, answer: str, distractor: str) -> bool:
    """Whether ``answer`` is named (as a word) before ``distractor`` is, or alone."""
    pos = {}
    for word in (answer, distractor):
        m = re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE)
        pos[word] = m.start() if m else None
    if pos[answer] is None:
        return False
    return pos[distractor] is None or pos[answer] < pos[distractor]


def _numbers(text: str) -> set[str]:
    """The numbers ``text`` names, as decimal strings."""
    return {str(NUMBER_WORDS.index(w.lower())) if w.lower() in NUMBER_WORDS else str(int(w))
            for w in _NUMBER.findall(text)}


def gold_terms(prompt: str, response: str, ended: bool) -> dict:
    """The scorer's ingredients (module docstring), for inspection and reports."""
    q = parse_question(prompt)
    if q is None:
        raise ValueError(f"no short-answers question in the prompt {prompt[:200]!r}")
    words = [w.lower() for w in _WORD.findall(response)]
    counts: dict[str, int] = {}
    for w in words:
        if w not in STOPWORDS:
            counts[w] = counts.get(w, 0) + 1
    right = is_correct(q["kind"], q["answer"], q["distractor"], response, q.get("addends", set()))
    return {"kind": q["kind"], "correct": bool(right), "ended": bool(ended), "words": len(words),
            "repeats": any(c >= 3 for c in counts.values())}


def is_correct(kind: str, answer: str, distractor: str, response: str, addends: set[str] = frozenset()) -> bool:
    """The correctness rule of the gold (module docstring) for a question whose reference is given:
    the answer named before the distractor (or alone); for a sum, the sum named and no number
    but it and the ``addends``."""
    if kind == "add":
        named = _numbers(response)
        return answer in named and named <= set(addends) | {answer}
    return _first_named(response, answer, distractor)


def correct(prompts: list[str], completions: list[str], ended: list[bool], answer: list, distractor: list,
            kind: list) -> list[float | None]:
    """Verifier: 1.0 when a completion answers its question correctly, judged against the record's
    ``answer``, ``distractor`` and ``kind`` columns (:func:`prompt_records`), else 0.0; None for a
    record without an answer. Use as a reward (``rewards: [{fn: align.demo.tasks.short_answers:correct}]``)
    or in evaluation (``eval.verifiers``). Correctness only: length and the stop token are not its
    business (the gold's other terms)."""
    out: list[float | None] = []
    for p, c, a, d, k in zip(prompts, completions, answer, distractor, kind, strict=True):
        q = parse_question(p) if k == "add" else None
        addends = q["addends"] if q is not None and q["kind"] == "add" else set()
        out.append(None if a is None else float(is_correct(k, str(a), str(d or ""), c, addends)))
    return out


def gold_score(prompt: str, response: str, ended: bool) -> float:
    """Hidden gold quality of ``response`` (text without special tokens) to the question in
    ``prompt``; ``ended``: whether the response stopped with the stop token."""
    t = gold_terms(prompt, response, ended)
    if t["words"] == 0:
        return -1.0 - (0.0 if t["ended"] else 0.5)
    return (float(t["correct"]) - (0.0 if t["ended"] else 0.5) - 0.05 * max(0, t["words"] - MAX_WORDS)
            - (0.5 if t["repeats"] else 0.0))


def gold_scores(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
    """Batched :func:`gold_score` (the ``module:function`` the policy and eval stages call)."""
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, {len(ended)} ended")
    return [gold_score(p, r, e) for p, r, e in zip(prompts, responses, ended)]


def gold_summary(prompts: list[str], responses: list[str], ended: list[bool]) -> dict:
    """Shares and means of the gold's ingredients over a set of responses: the report's
    "correct 0.61 -> 0.78, words 17 -> 8" line."""
    terms = [gold_terms(p, r, e) for p, r, e in zip(prompts, responses, ended)]
    n = max(len(terms), 1)
    return {"correct": sum(t["correct"] for t in terms) / n, "ended": sum(t["ended"] for t in terms) / n,
            "mean_words": sum(t["words"] for t in terms) / n,
            "over_length": sum(t["words"] > MAX_WORDS for t in terms) / n,
            "repeats": sum(t["repeats"] for t in terms) / n, "empty": sum(t["words"] == 0 for t in terms) / n}
