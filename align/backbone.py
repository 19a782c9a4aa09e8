"""Load and freeze the shared backbone (a Hugging Face causal LM) and its tokenizer.

The backbone is loaded once per process; every role is a set of adapters over it. Its weights
never receive gradients or optimizer state (docs/invariants.md #1), and every saved adapter records
its :func:`fingerprint` (#8).

``model.path`` is a Hugging Face model directory, a llama.cpp ``.gguf`` file, or a Hugging Face
Hub id (``org/name[@revision]``) read from the local Hugging Face cache, never the network
(align/hub.py). A GGUF file is de-quantized once by transformers (through the ``gguf`` package)
into a plain directory under ``$ALIGN_CACHE_DIR`` (default ``~/.cache/align``) ``/gguf/<sha256 of
the file>/`` and loaded from there afterwards (:func:`resolve_checkpoint`).

The fingerprint is a property of the checkpoint on disk (a hash of its weight files, or of the
GGUF file it came from), computed before align touches the model: the same in every process, with
any seed, any ``model.dtype`` and any ``model.quantization``. When the tokenizer has no PAD, or
its PAD is a stop token (SmolLM2, Qwen: PAD == EOS), ``load_tokenizer`` adds ``<|align_pad|>``;
``load_backbone`` gives it a zero embedding row (never a random one) and ``AlignModel`` masks its
logit out of every distribution (align/tokens.py).

``model.quantization`` (``none`` | ``int8`` | ``nf4``) loads the frozen backbone's Linear layers
through transformers' ``BitsAndBytesConfig`` (bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` with
double quantization, ``model.dtype`` as the compute dtype), QLoRA style. Embeddings, norms and the
LM head stay in ``model.dtype``. Adapters hook the quantized modules as they hook float ones; the
``full`` and ``top_k`` baselines, which train backbone weights, are refused on it
(``align.quantization``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from align.tokens import PAD_TOKEN, compute_specials, specials

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SOURCE_RECORD = "align_source.json"


def quantization_config(quantization: str, dtype: str):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` with ``model.dtype`` as the
    compute dtype (None for ``none``): ``align.quantization.quantization_config``."""
    from align.quantization import quantization_config as config_for
    return config_for(quantization, DTYPES.get(dtype, dtype))


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE_DIR") or Path.home() / ".cache" / "align").expanduser()


def _sha256_file(path: Path, h=None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h


@functools.lru_cache(maxsize=8)
def _gguf_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a GGUF file, once per process per file version (a stage resolves the same path
    for its tokenizer and its model)."""
    return _sha256_file(Path(path)).hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The HF directory to load ``path`` from: ``path`` itself, for a Hub id that is not a path on
    disk its snapshot in the local Hugging Face cache (``align.hub.resolve_model``), or for a
    ``.gguf`` file the directory it was de-quantized into (made on first use; written under a
    temporary name and renamed, so a killed conversion never leaves a directory that looks
    finished)."""
    p = Path(path).expanduser()
    if not p.exists():
        from align.hub import resolve_model
        return resolve_model(path)   # a cached Hub id, or FileNotFoundError naming model.path
    if not (p.is_file() and p.suffix.lower() == ".gguf"):
        return p
    st = p.stat()
    digest = _gguf_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    final = cache_root() / "gguf" / digest[:16]
    if (final / SOURCE_RECORD).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=final.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        # the weights are plain floats now: a directory that claims GGUF quantization would not load
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)
        (tmp / SOURCE_RECORD).write_text(json.dumps(
            {"source": str(p.resolve()), "sha256": digest, "fingerprint": "sha256:" + digest[:32]}, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (final / SOURCE_RECORD).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def checkpoint_fingerprint(directory: str | Path) -> str | None:
    """A hash of the checkpoint's weight files as they are on disk (None when it has none, e.g.
    a remote id). A directory made from a GGUF file carries the GGUF file's hash. Hashes are
    remembered per (path, size, mtime) in the cache, so a large checkpoint is read once."""
    d = Path(directory)
    if (d / SOURCE_RECORD).exists():
        return json.loads((d / SOURCE_RECORD).read_text())["fingerprint"]
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        return None
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    memo_file = cache_root() / "fingerprints.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        _sha256_file(f, h)
    fp = "sha256:" + h.hexdigest()[:32]
    try:
        memo[key] = fp
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return fp


def _generation_eos(directory: Path) -> list[int]:
    try:
        gen = GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        return []
    eos = gen.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with a PAD of its own and its ``Specials`` (align/tokens.py)."""
    src = resolve_checkpoint(path)
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    gen_eos = _generation_eos(src)
    stops = {tok.eos_token_id, *gen_eos}
    added = []
    if tok.pad_token_id is None or tok.pad_token_id in stops:
        # A PAD distinct from every stop token (docs/invariants.md #9): masks built from PAD must
        # never hide the token that ends a response.
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(tok.pad_token_id)
    tok.__dict__["_align_specials"] = compute_specials(tok, gen_eos, added, chat_template)
    tok.__dict__["_align_generation_eos"] = gen_eos
    return tok


def set_chat_template(tok: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    """Use ``chat_template`` (a stage's ``data.chat_template``) for the end-of-turn stop token too."""
    if chat_template:
        sp = specials(tok)
        tok.__dict__["_align_specials"] = compute_specials(
            tok, tok.__dict__.get("_align_generation_eos"), sp.added_ids, chat_template)


def load_backbone(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                  trust_remote_code: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                  quantization: str = "none"):
    """Load a causal LM, put it in eval mode (dropout off) and freeze every parameter.
    ``quantization`` int8 / nf4: bitsandbytes weights, placed on ``device`` at load."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    qcfg = quantization_config(quantization, dtype)
    src = resolve_checkpoint(path)
    kwargs = {}
    if qcfg is not None:  # bitsandbytes modules cannot be moved after load: place them now
        kwargs = {"quantization_config": qcfg, "device_map": {"": str(torch.device(device))}}
    model = _from_pretrained(src, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs)
    model._align_quantization = quantization
    fp = checkpoint_fingerprint(src)
    if fp is not None:
        # the checkpoint's, not the loaded (possibly quantized) bytes': an adapter trained on the
        # nf4 backbone attaches to the float one and back
        model._align_fingerprint = fp   # before align changes anything (the PAD row below)
    if tokenizer is not None:
        added = specials(tokenizer).added_ids
        n_old = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > n_old:
            # deterministic rows (zeros), not the resize's random ones: the fingerprint and every
            # process see the same model; the PAD logit is masked anyway (AlignModel.lm_logits)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            out = model.get_output_embeddings()
            partition_like_the_rest(model, [model.get_input_embeddings(), out])
            rows = [model.get_input_embeddings().weight] + (
                [] if out is None else [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else []))
            with gathered_whole(rows, modifier_rank=0), torch.no_grad():
                for t in rows:
                    t[n_old:] = 0
        model._align_masked_ids = tuple(added)
    if is_partitioned(model):
        pass  # loaded partitioned under ZeRO-3 (zero.Init): each partition is already on its device
    elif qcfg is None:
        model.to(device)
    else:
        keep_quantized_weights_as_loaded(model)
        release_checkpoint_mapping(model)
    freeze(model)
    return model


def _from_pretrained(src: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``, except for a multimodal checkpoint whose language
    model align serves alone (``align.arch.TEXT_PARTS``: Gemma-3): its text part, loaded with
    transformers' own text class and its ``text_config``; every text weight must come from the
    checkpoint, and only the parts named there (vision tower, projector) may be left out."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from align.arch import TEXT_PARTS, UnsupportedArchitecture
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=kwargs.get("trust_remote_code", False))
    part = TEXT_PARTS.get(config.model_type)
    if part is None:
        return AutoModelForCausalLM.from_pretrained(str(src), **kwargs)
    class_name, renames, left_out = part
    cls = getattr(transformers, class_name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists every vision weight as unexpected
    try:
        model, info = cls.from_pretrained(str(src), config=config.get_text_config(), key_mapping=renames,
                                          output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", ()))
    stray = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(left_out))
    if missing or stray or info.get("mismatched_keys"):
        raise UnsupportedArchitecture(
            f"{src}: a {config.model_type!r} checkpoint whose language model did not load whole as {class_name} "
            f"(missing {missing[:4]}, unexpected {stray[:4]}, mismatched {list(info.get('mismatched_keys', ()))[:4]}); "
            f"its weight names are not in a layout align knows")
    return model


def release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Copy a quantized backbone's remaining float tensors (embeddings, norms, an untied head) out of
    the checkpoint file. transformers reads safetensors through a memory map and leaves those
    tensors as views into it, so the whole float checkpoint stays mapped, and every page read while
    quantizing stays resident: measured on a 100M Llama on CPU, 886 MiB RSS after an nf4 load
    against 511 MiB with the copies (the packed weights are 51 MiB). On an accelerator the tensors
    were already copied to its memory."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.dtype.is_floating_point:
                t.data = t.data.clone()


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ``model`` was built under DeepSpeed ZeRO-3's ``zero.Init`` (the ``zero3`` presets:
    accelerate's ``zero3_init_flag``, through which transformers' ``from_pretrained`` creates every
    parameter as this process's partition and loads the checkpoint one module at a time)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def partition_like_the_rest(model: torch.nn.Module, modules) -> None:
    """Partition ``modules`` (the embeddings ``resize_token_embeddings`` just replaced) when the
    rest of ``model`` is ZeRO-3 partitioned. transformers builds the resized embeddings whole on
    every process and leaves them to ``deepspeed.initialize``; with a 128k vocabulary that is a
    whole embedding (and an untied head) per process until then. Already partitioned (tied)
    parameters are skipped by DeepSpeed."""
    if not is_partitioned(model):
        return
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config
    for module in modules:
        if module is not None:
            deepspeed.zero.Init(module=module, config_dict_or_path=deepspeed_config())


@contextlib.contextmanager
def gathered_whole(params, modifier_rank=None):
    """``params`` whole inside the context when ZeRO-3 partitioned them (a change made on
    ``modifier_rank`` is partitioned back to every process), as they are otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def keep_quantized_weights_as_loaded(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' in-place CPU repacking of 4-bit weights. On a CPU with AVX512-BF16,
    ``Linear4bit`` rewrites its weight on the first no-grad forward (another nibble order, the
    double quantization undone, absmax rounded to bfloat16) and ``state_dict()`` rewrites it back,
    best effort: the frozen backbone would change with the call history (docs/invariants.md #1)
    and a grad forward would compute with other weights than a no-grad one. With it off every
    forward dequantizes the weights exactly as loaded."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def fingerprint(model: torch.nn.Module) -> str:
    """The backbone's fingerprint: the checkpoint's (set by ``load_backbone``), or for a model
    built in memory a content hash of its weights (rounded to bfloat16) and architecture."""
    cached = getattr(model, "_align_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.model_type}|{cfg.vocab_size}|{getattr(cfg, 'hidden_size', '')}".encode())
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in sorted(model.state_dict().items()):
        p = params.get(name)
        if p is not None and hasattr(p, "ds_id"):  # partitioned at load under ZeRO-3: gather one at a time
            with gathered_whole([p]):
                t = p.detach().clone()
        t = t.detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    fp = "sha256:" + h.hexdigest()[:32]
    model._align_fingerprint = fp
    return fp
