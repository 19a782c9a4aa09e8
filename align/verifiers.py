"""Built-in verifiable rewards: functions a ``rewards`` entry (or ``reward_fn``, ``eval.verifiers``)
names by their bare name (``fn: exact_match``) or as ``align.verifiers:exact_match``.

Each is called as every programmatic reward is (align/scoring.py ``call_scorer``, TRL's convention):
``fn(prompts, completions, ended, **columns) -> list[float | None]``, with the prompt records' other
fields as keyword arguments; a parameter that is not a data column is given in the entry's ``args``
(``{fn: regex_match, args: {pattern: "^[A-Z]"}}``). A verifier returns 1.0 (pass) or 0.0 (fail), and
None for a record without a reference (no opinion: that sample's score leaves this source out), so
its logged mean is its pass rate. Docs: docs/verifiers.md.
"""
from __future__ import annotations

import re
import string
from fractions import Fraction
from typing import Sequence

BUILTINS = ("exact_match", "numeric_match", "regex_match", "length_penalty")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and the articles a/an/the removed,
    whitespace collapsed (``"The Shed."`` -> ``"shed"``)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_lengths(prompts: Sequence, completions: Sequence, column: Sequence, name: str) -> None:
    if not len(prompts) == len(completions) == len(column):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(completions)} completions, "
                         f"{len(column)} values of {name!r}")


def exact_match(prompts, completions, ended, answer) -> list[float | None]:
    """1.0 when the completion equals the record's ``answer`` after :func:`normalize_answer`
    (a list of accepted answers also works), else 0.0; None where ``answer`` is None."""
    _check_lengths(prompts, completions, answer, "answer")
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        accepted = {normalize_answer(str(x)) for x in (a if isinstance(a, (list, tuple)) else [a])}
        out.append(float(normalize_answer(c) in accepted))
    return out


def last_number(text: str) -> Fraction | None:
    """The number a completion ends on: the content of its last ``\\boxed{}`` when it has one,
    else its last number (``1,234``, ``-3.5``, ``3/4`` read as such); None when it names none."""
    boxed = _BOXED.findall(text)
    found = _NUMBER.findall(boxed[-1] if boxed else text) or (_NUMBER.findall(text) if boxed else [])
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def numeric_match(prompts, completions, ended, answer) -> list[float | None]:
    """1.0 when the completion's answer equals the record's numeric ``answer``, else 0.0; None
    where ``answer`` is None. With ``math-verify`` installed (``pip install 'align[verify]'``) both
    are parsed and compared by it (LaTeX, fractions, sets, ...); without it the completion's
    :func:`last_number` is compared exactly with the answer read as a number (``"0.5"`` = ``"1/2"``).
    The fallback reads plain numbers only: an answer it cannot read as one raises."""
    _check_lengths(prompts, completions, answer, "answer")
    mv = _math_verify()
    out: list[float | None] = []
    for i, (c, a) in enumerate(zip(completions, answer)):
        if a is None:
            out.append(None)
            continue
        if mv is not None:
            parse, verify = mv
            gold = parse(str(a) if any(ch in str(a) for ch in "$\\") else f"${a}$")
            out.append(float(bool(verify(gold, parse(c)))))
            continue
        try:
            want = Fraction(str(a).replace(",", "").strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"answer {a!r} of record {i} is not a plain number; install math-verify "
                             f"(pip install 'align[verify]') to compare such answers") from None
        out.append(float(last_number(c) == want))
    return out


def regex_match(prompts, completions, ended, *, pattern: str, full: bool = False) -> list[float]:
    """1.0 when ``pattern`` (a Python regex, given in the entry's ``args``) is found in the
    completion (``full``: matches all of it), else 0.0: a format check."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [float(match(c) is not None) for c in completions]


def length_penalty(prompts, completions, ended, *, max_words: int = 50, per_word: float = 0.05,
                   unended: float = 0.0) -> list[float]:
    """``-per_word`` for every word past ``max_words``, and ``-unended`` when the completion did not
    end with the stop token (was cut at the length limit): 0 for an answer within bounds. Words are
    whitespace-separated; for a token-exact bound use the GRPO stage's ``overlong_buffer``."""
    if max_words < 0 or per_word < 0 or unended < 0:
        raise ValueError("length_penalty: max_words, per_word and unended must be >= 0")
    return [-per_word * max(0, len(c.split()) - max_words) - (0.0 if e else unended)
            for c, e in zip(completions, ended)]


def resolve(spec: str) -> str:
    """A bare built-in name (``exact_match``) -> ``align.verifiers:exact_match``; anything else as given."""
    return f"{__name__}:{spec}" if isinstance(spec, str) and spec in BUILTINS else spec
