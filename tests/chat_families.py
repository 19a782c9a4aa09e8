"""Tokenizers of the chat-template families, built offline: the tiny test tokenizer with each
family's special tokens, BOS/EOS and its published chat template (tests/fixtures/chat_templates/,
README there), saved and loaded through ``align.backbone.load_tokenizer`` as a real checkpoint is."""
from __future__ import annotations

from pathlib import Path

from tokenizers import processors
from transformers import AutoTokenizer

from align.data.sft import IGNORE

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

# the conversation the template tests render: a system turn, then three user/assistant exchanges
SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, and also red."},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."},
]

# family: (its special tokens, BOS, EOS, end of turn, does the tokenizer itself put the BOS in front)
FAMILIES = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", False),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", True),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", True),
    "phi3": (["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>",
             "<|end|>", False),
}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def family_tokenizer(tiny_path, family: str, out_dir, chat_template: str | None = None):
    """The tiny tokenizer dressed as ``family``'s (its template unless ``chat_template``), saved in
    ``out_dir`` and loaded with align's loader (which adds a PAD of its own where needed)."""
    from align.backbone import load_tokenizer
    specials, bos, eos, _, adds_bos = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(tiny_path))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    tok.bos_token = bos or tok.bos_token
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                          special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])])
    tok.chat_template = chat_template or template(family)
    tok.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def spans(ex) -> list[list[int]]:
    """The runs of labelled tokens (each label the token itself)."""
    out, cur = [], []
    for tok, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])
