"""The quantized-backbone policy, in one place (docs/quantization.md).

``model.quantization`` (``none`` | ``int8`` | ``nf4``) stores the frozen backbone's Linear weights
through bitsandbytes, QLoRA style, still shared by every role. Here: the choices, transformers'
loading config for each, how a loaded backbone says which it has, and what a quantized backbone
refuses, with the messages every entry point gives (config checks, the pipeline, the adapter
sets, the distributed runtime):

* methods that train backbone weights (``full``, ``top_k``): the weights are frozen integers;
* sharding presets (ZeRO-3, FSDP2): bitsandbytes' packed weights only work whole;
* a run without bitsandbytes installed.
"""
from __future__ import annotations

import importlib.util

QUANTIZATIONS = ("none", "int8", "nf4")
INSTALL = "pip install 'align[quant]', i.e. bitsandbytes>=0.50"


def bitsandbytes_problem(quantization: str) -> str | None:
    """Why ``quantization`` cannot run here (bitsandbytes missing), or None."""
    if quantization in ("int8", "nf4") and importlib.util.find_spec("bitsandbytes") is None:
        return f"needs bitsandbytes, which is not installed ({INSTALL})"
    return None


def quantization_config(quantization: str, compute_dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (None for ``none``): int8
    (``Linear8bitLt``) or nf4 with double quantization and ``compute_dtype`` (``Linear4bit``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization: {quantization!r} is not one of {list(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if (problem := bitsandbytes_problem(quantization)) is not None:
        raise ImportError(f"model.quantization={quantization} {problem}")
    from transformers import BitsAndBytesConfig
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantization_of(backbone) -> str:
    """``none``, ``int8`` or ``nf4``: how the loaded backbone's Linear weights are stored."""
    q = getattr(backbone, "_align_quantization", None)
    if q is not None:
        return q
    if getattr(backbone, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(backbone, "is_loaded_in_8bit", False):
        return "int8"
    return "none"


def quantized_refusal(method: str, quantization: str) -> str:
    """Why adapter ``method``, which trains backbone weights, is refused on a quantized backbone."""
    return (f"adapter method {method!r} trains backbone weights, which are frozen {quantization} "
            f"integers on a quantized backbone (model.quantization={quantization}); use a "
            f"parameter-efficient method (lora, bottleneck, prefix, ia3, prompt, ptuning, "
            f"llama_adapter) or model.quantization=none")


def refuse_quantized(method: str, backbone) -> None:
    """A method that trains backbone weights (``AdapterSet.trains_backbone``: the ``full`` /
    ``top_k`` baselines) is refused on an int8 / nf4 backbone."""
    q = quantization_of(backbone)
    if q != "none":
        raise ValueError(quantized_refusal(method, q))


def sharded_quantization_problem(quantization: str, rt) -> str | None:
    """A quantized backbone cannot be sharded: the zero3 and fsdp2 presets partition every
    parameter of the model they are given, and bitsandbytes' packed integer weights only mean
    something whole, next to their quantization state (absmax, code), which is not a parameter
    and would not follow. Replicate it instead (ddp, zero2: the backbone is frozen, so only the
    adapters' gradients and optimizer state are split) -- the 4-bit backbone is a quarter of the
    bf16 one on every process. docs/distributed.md."""
    if quantization in (None, "none"):
        return None
    if rt.zero_stage == 3:
        sharding = "DeepSpeed ZeRO stage 3 (the zero3 / zero3_offload presets, or a stage-3 DeepSpeed config)"
    elif rt.fsdp is not None:
        sharding = "FSDP2 (the fsdp2 preset)"
    else:
        return None
    return (f"model.quantization={quantization}: a quantized backbone cannot be sharded, and this run was "
            f"launched with {sharding}, which partitions every parameter while bitsandbytes' packed weights "
            f"only work whole; launch it with the ddp or zero2 preset (configs/accelerate/), which keep one "
            f"quantized backbone per process, or set model.quantization=none")
