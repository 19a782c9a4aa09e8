"""Where a sequence begins and a response ends, for any tokenizer: one definition for every stage.

Real checkpoints disagree on their special tokens. SmolLM2 and Qwen use ChatML, whose assistant
turn ends ``<|im_end|>\\n`` and whose PAD is EOS; Llama-3-Instruct ends a turn with ``<|eot_id|>``
while its ``generation_config`` lists three EOS ids; Llama-2/Mistral tokenizers put a BOS in
front of every text. ``Specials`` reads all of that once, when the tokenizer is loaded, and every
stage asks it rather than ``tokenizer.eos_token_id``:

* ``stop_ids``: any of these ends a response: the tokenizer's EOS, every id of the checkpoint's
  ``generation_config.eos_token_id`` and the chat template's end-of-turn token. SFT labels, reward
  data, rollouts, the reward read-out and evaluation all cut a response after its *first* stop
  token, so the token the reward model reads at is the token PPO stops at.
* ``end_id``: appended to a completion that has no stop token (plain-text data): the EOS.
* ``bos_ids``: what the tokenizer puts in front of a text with ``add_special_tokens=True``
  (empty for most chat models); added to the start of every prompt exactly once, never twice
  when a chat template already wrote it.
* ``pad_id`` and ``added_ids``: a PAD of its own (align adds one when the checkpoint has none or
  when PAD is a stop token, see docs/invariants.md), whose logit is masked out of every
  distribution so it can never be sampled or take probability mass (``AlignModel.lm_logits``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

PAD_TOKEN = "<|align_pad|>"


@dataclass(frozen=True)
class Specials:
    pad_id: int
    end_id: int
    stop_ids: tuple[int, ...]
    bos_ids: tuple[int, ...] = ()
    added_ids: tuple[int, ...] = ()

    def with_bos(self, ids: list[int]) -> list[int]:
        """``ids`` with the tokenizer's BOS in front, unless they already start with it."""
        n = len(self.bos_ids)
        if not n or list(ids[:n]) == list(self.bos_ids):
            return list(ids)
        return list(self.bos_ids) + list(ids)

    def cut_at_stop(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """``ids`` up to and including the first stop token, and whether there was one."""
        stops = set(self.stop_ids)
        for i, t in enumerate(ids):
            if t in stops:
                return list(ids[:i + 1]), True
        return list(ids), False


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


def template_end_of_turn(tokenizer, chat_template: str | None = None) -> int | None:
    """The special token a chat template writes right after an assistant message (ChatML's
    ``<|im_end|>``, Llama-3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), or None."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    marker = "Zq7xMarker"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=template)
    except Exception:  # templates that demand a system turn or other roles: no end-of-turn known
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    tail = text[text.rindex(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for t in tokenizer(tail, add_special_tokens=False).input_ids:
        if t in special:
            return int(t)
    return None


def bos_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer adds in front of a text (its BOS), found by tokenizing with and
    without special tokens."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return tuple(full[:k])
    return ()


def compute_specials(tokenizer, generation_eos: Iterable[int] | int | None = None,
                     added_ids: Iterable[int] = (), chat_template: str | None = None) -> Specials:
    eos = tokenizer.eos_token_id
    stops: list[int] = []
    for t in _as_list(eos) + _as_list(generation_eos) + _as_list(template_end_of_turn(tokenizer, chat_template)):
        if t not in stops:
            stops.append(t)
    if not stops:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token and its checkpoint lists none: "
                         f"align needs a token that ends a response")
    pad = tokenizer.pad_token_id
    if pad is None or pad in stops:
        raise ValueError(f"PAD ({pad}) must exist and differ from every stop token {stops}; "
                         f"load the tokenizer with align.backbone.load_tokenizer")
    return Specials(pad_id=int(pad), end_id=int(eos if eos is not None else stops[0]), stop_ids=tuple(stops),
                    bos_ids=bos_prefix(tokenizer), added_ids=tuple(int(i) for i in added_ids))


def specials(tokenizer) -> Specials:
    """The tokenizer's ``Specials`` (computed by ``load_tokenizer``; computed here for tokenizers
    built another way, with no generation config)."""
    sp = tokenizer.__dict__.get("_align_specials")
    if sp is None:
        sp = compute_specials(tokenizer)
        tokenizer.__dict__["_align_specials"] = sp
    return sp


def encode(tokenizer, text: str, *, bos: bool) -> list[int]:
    """Token ids of ``text``; ``bos=True`` for the start of a sequence (a prompt)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return specials(tokenizer).with_bos(ids) if bos else ids
