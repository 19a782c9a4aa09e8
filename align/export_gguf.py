"""``align export --format gguf``: the merged policy as one llama.cpp GGUF file, written with the
``gguf`` package's ``GGUFWriter`` (Llama family only, SmolLM2 included).

What llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for a Llama checkpoint, and so
what llama.cpp and transformers' GGUF loader expect:

* tensor names from the ``gguf`` package's name map for ``MODEL_ARCH.LLAMA`` (``token_embd``,
  ``blk.N.attn_q`` ..., ``output_norm``, ``output``; no ``output`` when the head is tied);
* the query and key projections with their rows permuted from Hugging Face's rotate-half layout
  to the interleaved-pairs layout ggml's RoPE uses (per head: rows ``0, d/2, 1, d/2+1, ...``);
* hyper-parameters under ``llama.*``; 1-D tensors (norms) always F32; 2-D tensors F32, F16 or
  Q8_0 (``gguf.quants.quantize``; a row whose length is not a multiple of 32 falls back to F16);
* the tokenizer as ``tokenizer.ggml.*``: model ``gpt2`` (byte-level BPE), the pre-tokenizer's
  name, tokens with their types (special added tokens CONTROL, others USER_DEFINED), merges,
  BOS / EOS / UNK / PAD ids, the end-of-turn id (EOT), whether to add BOS, and the chat template.

Anything else (another architecture, a SentencePiece tokenizer, RoPE scaling, biases) is refused
before anything is written (``gguf_refusal``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

QTYPES = ("f32", "f16", "q8_0")


def _tokenizer_json(src: Path) -> dict | None:
    f = src / "tokenizer.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _source_gguf_pre(src: Path) -> str | None:
    """The pre-tokenizer name recorded in the GGUF file a backbone directory was made from."""
    rec = src / "align_source.json"
    if not rec.is_file():
        return None
    import gguf
    source = json.loads(rec.read_text()).get("source")
    if not source or not Path(source).is_file():
        return None
    field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _pre_from_tokenizer(tj: dict) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer: ``gpt-2`` (GPT-2's split) or ``smollm``
    (each digit on its own, then GPT-2's split); None for anything else."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"
    return None


def pre_tokenizer_name(src: Path) -> str | None:
    tj = _tokenizer_json(src)
    return _source_gguf_pre(src) or (None if tj is None else _pre_from_tokenizer(tj))


def gguf_refusal(backbone_path: str) -> str | None:
    """Why the backbone cannot be written as a llama.cpp Llama GGUF (None when it can)."""
    from transformers import AutoConfig

    from align.backbone import resolve_checkpoint
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "needs the gguf package (pip install 'align[export]')"
    src = resolve_checkpoint(backbone_path)
    cfg = AutoConfig.from_pretrained(str(src))
    if cfg.model_type != "llama":
        return (f"the backbone's architecture is {cfg.model_type} ({', '.join(cfg.architectures or [])}); "
                f"GGUF export writes the Llama family (llama, SmolLM2) only: use --format hf")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"RoPE scaling {rope.get('rope_type')!r} is not written; use --format hf"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "a Llama with attention or MLP biases is not written; use --format hf"
    tj = _tokenizer_json(src)
    if tj is None or (tj.get("model") or {}).get("type") != "BPE":
        return f"{src}: only byte-level BPE tokenizers (tokenizer.json, model BPE) are written"
    if pre_tokenizer_name(src) is None:
        return (f"{src / 'tokenizer.json'}: pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:120]} has no "
                f"llama.cpp name known here (gpt-2, smollm); llama.cpp would split text differently")
    return None


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotate-half order to ggml's interleaved pairs."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_data(t: torch.Tensor, qtype: str):
    """(numpy data, raw dtype or None) for one tensor at ``qtype``."""
    import gguf
    arr = t.detach().float().cpu().numpy()
    if arr.ndim < 2 or qtype == "f32":
        return arr.astype(np.float32), None
    if qtype == "q8_0" and arr.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr, q), q
    return arr.astype(np.float16), None


def _hparams(writer, config, n_vocab: int, qtype: str) -> None:
    import gguf
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])


def _vocab(orig, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf
    by_id = {i: t for t, i in orig.get_vocab().items()}
    added = orig.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tokenizer_metadata(writer, src: Path, n_vocab: int, chat_template: str | None) -> None:
    from transformers import AutoTokenizer

    from align.tokens import bos_prefix, template_end_of_turn
    orig = AutoTokenizer.from_pretrained(str(src))
    tokens, types = _vocab(orig, n_vocab)
    merges = (_tokenizer_json(src) or {}).get("model", {}).get("merges", [])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(src))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for tid, add in ((orig.bos_token_id, writer.add_bos_token_id), (orig.eos_token_id, writer.add_eos_token_id),
                     (orig.unk_token_id, writer.add_unk_token_id), (orig.pad_token_id, writer.add_pad_token_id)):
        if tid is not None:
            add(int(tid))
    template = chat_template or orig.chat_template
    eot = template_end_of_turn(orig, template)
    if eot is not None:
        writer.add_eot_token_id(int(eot))
    writer.add_add_bos_token(bool(bos_prefix(orig)))
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)


def write_gguf(model, tok, role: str, info, out: Path, qtype: str = "f32") -> str:
    """Write the merged ``role`` to ``out/<role>-<qtype>.gguf``; returns the file name."""
    import gguf

    from align.export_hf import causal_lm_weights
    if qtype not in QTYPES:
        raise ValueError(f"--dtype {qtype}: GGUF export writes {', '.join(QTYPES)}")
    sd, config, src = causal_lm_weights(model, role, info)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    name = f"{role}-{qtype}.gguf"
    writer = gguf.GGUFWriter(str(out / name), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(f"{info.path.name} {role}")
    _hparams(writer, config, config.vocab_size, qtype)
    _tokenizer_metadata(writer, src, config.vocab_size, info.chat_template)
    kv = config.num_key_value_heads or config.num_attention_heads
    for k in sorted(sd):
        t = sd[k]
        if k.endswith("self_attn.q_proj.weight"):
            t = permute_rotary(t, config.num_attention_heads)
        elif k.endswith("self_attn.k_proj.weight"):
            t = permute_rotary(t, kv)
        target = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"{k}: no llama.cpp tensor name for it (gguf's LLAMA name map)")
        data, raw = _tensor_data(t, qtype)
        writer.add_tensor(target, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name
