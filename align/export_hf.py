"""Merging a role's adapter stack into the backbone weights, and writing the result as a Hugging
Face checkpoint (a causal LM, or a reward role as a one-label sequence classifier).

The merge follows the hooks ``AlignModel`` installs, so it is exact (up to float round-off): on a
Linear layer ``y = W x + b``, the "in" hooks of the stack (IA3's feed-forward vectors) scale ``x``
before the layer, the "out" hooks then run in stack order on ``y``. With ``s`` the product of the
input scales and ``W' = W diag(s)``:

* LoRA adds ``scaling * B A x`` (``x`` the scaled input): ``W' += scaling * B A diag(s)``
* IA3 on an output scales it: ``W' = diag(l) W'``, ``b' = l * b``
* ``full`` / ``top_k`` replace the module's output with their copy's: ``W' = W_copy diag(s)``,
  and every other tensor of the module (norm, embedding) is the copy's.

Methods whose effect is not a function of one layer's weights are refused (``merge_refusal``).
The causal LM is written with the checkpoint's own vocabulary: rows align added for its PAD token
are dropped (align masks their logits anyway), so the export's tokenizer is the original one.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from align.adapters.lora import key

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def merge_refusal(method: str) -> str | None:
    """Why ``method`` cannot be merged into the backbone weights (None when it can): each method
    class declares it (``AdapterSet.merge_refusal``)."""
    from align.adapters.base import METHODS
    cls = METHODS.get(method)
    return "is not an align adapter method" if cls is None else cls.merge_refusal


def original_vocab_size(checkpoint_dir: Path) -> int:
    """Rows of the checkpoint's own embedding (before align added its PAD)."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(checkpoint_dir))
    return int(getattr(cfg.get_text_config(), "vocab_size"))


def _weight(sd: dict, path: str, conv1d: bool) -> torch.Tensor:
    """The [out, in] view of ``path``'s weight (Conv1D stores [in, out])."""
    w = sd[f"{path}.weight"]
    return w.T if conv1d else w


def _input_scales(sets) -> dict[str, torch.Tensor]:
    scales: dict[str, torch.Tensor] = {}
    for aset in sets:
        if aset.method == "ia3":
            for p in aset.paths:
                if aset.kind[p] == "ff":
                    s = aset.scale(p).detach().float().cpu()
                    scales[p] = scales[p] * s if p in scales else s
    return scales


def merged_state_dict(model, role: str) -> dict[str, torch.Tensor]:
    """The backbone's state dict (float32, CPU) with ``role``'s adapter stack merged in."""
    sets = [model.adapters[a] for a in model.roles[role].adapters]
    for aset in sets:
        if (why := merge_refusal(aset.method)) is not None:
            raise ValueError(f"adapter set {aset.set_name!r} ({aset.method}) {why}")
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.backbone.state_dict().items()}
    conv1d = model.arch.conv1d
    scales = _input_scales(sets)
    with torch.no_grad():
        for p, s in scales.items():
            _weight(sd, p, conv1d).mul_(s[None, :])
        for aset in sets:
            for p in aset.paths:
                _merge_one(sd, aset, p, scales.get(p), conv1d)
    return sd


def _merge_one(sd: dict, aset, p: str, in_scale: torch.Tensor | None, conv1d: bool) -> None:
    if aset.method == "lora":
        delta = aset.merged_delta(p).detach().float().cpu()
        _weight(sd, p, conv1d).add_(delta * in_scale[None, :] if in_scale is not None else delta)
    elif aset.method == "ia3":
        if aset.kind[p] == "ff":
            return
        v = aset.scale(p).detach().float().cpu()
        _weight(sd, p, conv1d).mul_(v[:, None])
        if f"{p}.bias" in sd:
            sd[f"{p}.bias"].mul_(v)
    else:   # full / top_k: the copy's output replaces the module's
        for name, t in aset.copies[key(p)].state_dict().items():
            sd[f"{p}.{name}"] = t.detach().to("cpu", torch.float32).clone()
        if in_scale is not None and f"{p}.weight" in sd:
            _weight(sd, p, conv1d).mul_(in_scale[None, :])


def _param_name(backbone, module) -> str | None:
    if module is None:
        return None
    return next(n for n, m in backbone.named_modules() if m is module) + ".weight"


def _untie_if_changed(backbone, sd: dict, config) -> None:
    """A tied embedding / LM head that the merge changed differently (a LoRA on the head, top_k's
    copied head) is written untied; an unchanged tie stays tied (one tensor in the file)."""
    emb = _param_name(backbone, backbone.get_input_embeddings())
    head = _param_name(backbone, backbone.get_output_embeddings())
    text = config.get_text_config()
    if not getattr(text, "tie_word_embeddings", False) or head is None:
        return
    if torch.equal(sd[emb], sd[head]):
        del sd[head]
    else:
        text.tie_word_embeddings = False
        config.tie_word_embeddings = False


def _save_weights(sd: dict, out: Path, dtype: str) -> str:
    from align.checkpoint import save_safetensors
    dt = HF_DTYPES[dtype]
    save_safetensors({k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
                     out / "model.safetensors", metadata={"format": "pt"})
    return "model.safetensors"


def _base_config(model, dtype: str):
    config = copy.deepcopy(model.backbone.config)
    config.dtype = str(HF_DTYPES[dtype]).removeprefix("torch.")
    return config


def causal_lm_weights(model, role: str, info, dtype: str = "f32"):
    """(merged state dict with the checkpoint's own vocabulary, its config, the checkpoint dir)."""
    from align.backbone import resolve_checkpoint
    src = resolve_checkpoint(info.backbone["path"])
    n_vocab = original_vocab_size(src)
    sd = merged_state_dict(model, role)
    emb = _param_name(model.backbone, model.backbone.get_input_embeddings())
    head = _param_name(model.backbone, model.backbone.get_output_embeddings())
    for k in (emb, head):
        if k is not None and k in sd and sd[k].shape[0] > n_vocab:
            sd[k] = sd[k][:n_vocab].clone()
    config = _base_config(model, dtype)
    config.vocab_size = n_vocab
    config.get_text_config().vocab_size = n_vocab
    _untie_if_changed(model.backbone, sd, config)
    config.architectures = [type(model.backbone).__name__]
    return checkpoint_names(model.backbone, sd), config, src


def checkpoint_names(backbone, sd: dict) -> dict:
    """``sd`` under the names the checkpoint uses, as transformers' ``save_pretrained`` writes
    them: transformers renames some weights at load (GPT-NeoX's ``embed_out`` is its ``lm_head``)
    and reverses that on save, so other readers of the export (older transformers, converters)
    find the layout they know."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(backbone, sd)


def write_causal_lm(model, tok, role: str, info, out: Path, dtype: str = "f32") -> list[str]:
    """The merged causal LM, its original tokenizer (with the run's chat template) and a generation
    config that stops at every token the policy was trained to stop at."""
    sd, config, src = causal_lm_weights(model, role, info, dtype)
    files = [_save_weights(sd, out, dtype)]
    config.save_pretrained(out)
    files += ["config.json"] + save_original_tokenizer(src, out, info.chat_template)
    files.append(save_generation_config(src, config, tok, out))
    return files


def save_original_tokenizer(src: Path, out: Path, chat_template: str | None) -> list[str]:
    from transformers import AutoTokenizer
    orig = AutoTokenizer.from_pretrained(str(src))
    if chat_template:
        orig.chat_template = chat_template
    before = set(p.name for p in out.iterdir())
    orig.save_pretrained(out)
    return sorted(set(p.name for p in out.iterdir()) - before)


def save_generation_config(src: Path, config, tok, out: Path) -> str:
    """``generation_config.json``: the checkpoint's, with ``eos_token_id`` every stop token align
    uses (EOS, the checkpoint's EOS list, the chat template's end of turn)."""
    from transformers import GenerationConfig

    from align.tokens import specials
    try:
        gen = GenerationConfig.from_pretrained(str(src))
    except (OSError, ValueError):
        gen = GenerationConfig.from_model_config(config)
    sp = specials(tok)
    gen.eos_token_id = list(sp.stop_ids)
    if sp.bos_ids:
        gen.bos_token_id = sp.bos_ids[0]
    if gen.pad_token_id is None or gen.pad_token_id in sp.added_ids:
        gen.pad_token_id = getattr(config, "pad_token_id", None)
    gen.save_pretrained(out)
    return "generation_config.json"


def sequence_classification_class(causal_name: str, model_type: str | None = None) -> str:
    """The ``ForSequenceClassification`` class of the backbone: transformers' own for its
    ``model_type`` (Gemma-3's text model: ``Gemma3TextForSequenceClassification``, not the
    multimodal ``Gemma3ForSequenceClassification``), else named after the causal-LM class."""
    from transformers import models  # noqa: F401 - the classes are looked up by name below
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as BY_TYPE
    name = BY_TYPE.get(model_type) or {"GPT2LMHeadModel": "GPT2ForSequenceClassification"}.get(
        causal_name, causal_name.replace("ForCausalLM", "ForSequenceClassification"))
    if not hasattr(transformers, name):
        raise ValueError(f"transformers has no {name} for a reward export of {causal_name}")
    return name


def write_reward(model, tok, role: str, info, out: Path, dtype: str = "f32") -> list[str]:
    """The reward role as ``<Family>ForSequenceClassification`` with one label: the backbone with
    the role's adapters merged, the head's weight as ``score.weight``. transformers has no bias on
    that layer: a non-zero head bias is recorded as ``align_score_offset`` in config.json (add it to
    match align's raw score). The tokenizer is align's, whose PAD differs from every stop token, so
    transformers reads the score at the last real token (the stop token) as align does."""
    name = sequence_classification_class(type(model.backbone).__name__, model.backbone.config.model_type)
    sd = merged_state_dict(model, role)
    head = _param_name(model.backbone, model.backbone.get_output_embeddings())
    sd.pop(head, None)
    linear = model.heads[model.roles[role].head].linear
    sd["score.weight"] = linear.weight.detach().float().cpu().clone()
    config = _base_config(model, dtype)
    config.architectures = [name]
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    config.get_text_config().pad_token_id = tok.pad_token_id
    config.vocab_size = model.backbone.get_input_embeddings().num_embeddings
    config.get_text_config().vocab_size = config.vocab_size
    config.tie_word_embeddings = False
    config.align_score_offset = float(linear.bias.detach().float().item()) if linear.bias is not None else 0.0
    config.align_reward_normalisation = info.roles[role].normalisation or {"mean": 0.0, "std": 1.0}
    files = [_save_weights(sd, out, dtype)]
    config.save_pretrained(out)
    tok.padding_side = "right"
    if info.chat_template:
        tok.chat_template = info.chat_template
    before = set(p.name for p in out.iterdir())
    tok.save_pretrained(out)
    files += ["config.json"] + sorted(set(p.name for p in out.iterdir()) - before)
    (out / "align_reward.json").write_text(json.dumps(
        {"score_offset": config.align_score_offset, "normalisation": config.align_reward_normalisation},
        indent=2))
    return files + ["align_reward.json"]
