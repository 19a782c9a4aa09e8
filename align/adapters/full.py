"""Baselines: full finetuning (``method: full``) and finetuning the top k blocks (``method: top_k``).

These are **not** parameter-efficient and do **not** share the backbone: the set holds a trainable
copy of the backbone modules it finetunes (for ``full`` a copy of every weight, i.e. a second
model's worth of memory, plus optimizer state for all of it). They still go through the adapter
protocol, so any role (policy, value, reward, reference) can be a baseline and roles still stack:
every copied module is a leaf that owns parameters (Linear / Conv1D, norms, embeddings), and an
"out" hook replaces the frozen module's output with the copy called on the same input. The
frozen module still runs first (its output is discarded), so a baseline costs about twice the
forward compute of the backbone for the copied part; the backbone itself stays untouched.

* ``full``: every parameter-owning module (embeddings, all blocks, final norm, LM head).
* ``top_k`` (``top_k: k``): the modules of the top k blocks, the final norm and the LM head.

Tied weights (e.g. gpt2's embedding and LM head) stay tied inside one copy. With ``top_k`` the LM
head is copied alone, so its copy is an untied, trainable head over the frozen embedding.

Stack a baseline first in a role: a set stacked before it on the same module has its output
replaced. HF peft has no such method; sets are saved in align's own format (the copied weights).
``expected_num_params`` is the parameter count of the copied backbone modules.

Both are refused on a quantized backbone (``model.quantization`` int8 / nf4): its weights are
frozen integers (by ``config.validate`` before a stage writes anything, and here at load).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from align.adapters.base import AdapterConfig, AdapterSet, register
from align.adapters.lora import key
from align.arch import Arch
from align.quantization import refuse_quantized
from align.rules import AT_LEAST_ONE


def param_leaves(backbone: nn.Module, prefix: str = ""):
    """(path, module) for every module under ``prefix`` that owns parameters directly."""
    out = []
    for path, m in backbone.named_modules():
        if not path or (prefix and not (path == prefix or path.startswith(prefix + "."))):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            if any(any(True for _ in c.parameters()) for c in m.children()):
                raise NotImplementedError(
                    f"{path} ({type(m).__name__}) owns parameters and has parameterised children; "
                    f"the full/top_k baselines copy leaf modules only")
            out.append((path, m))
    return out


class CopiedModules(AdapterSet):
    """Holds trainable copies of chosen backbone leaf modules and substitutes their outputs."""

    def __init__(self, name: str, config: AdapterConfig, arch: Arch, backbone: nn.Module):
        super().__init__(name, config, arch)
        refuse_quantized(self.method, backbone)  # integer weights cannot be copied and trained
        chosen = self.select(backbone)
        self.paths = [p for p, _ in chosen]
        # one deepcopy call, so parameters shared between the chosen modules stay shared
        copies = copy.deepcopy([m for _, m in chosen])
        for c in copies:  # deepcopy also copies hooks other sets installed on the originals
            for m in c.modules():
                for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                             "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
                    getattr(m, attr, {}).clear()
        self.copies = nn.ModuleDict({key(p): c for p, c in zip(self.paths, copies)})
        self.copies.requires_grad_(True)
        seen, n = set(), 0
        for _, m in chosen:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        self._expected = n

    def select(self, backbone: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def hook_points(self):
        return {(p, "out"): self._make_hook(p) for p in self.paths}

    def _make_hook(self, path: str):
        module = self.copies[key(path)]

        def replace(x, out):
            if x is None:
                raise RuntimeError(f"{path}: the copied module's input was not found in the call")
            return module(x).to(out.dtype)
        return replace

    def expected_num_params(self) -> int:
        return self._expected


@register
class FullFinetune(CopiedModules):
    method = "full"
    trains_backbone = True
    merge_refusal = None   # its copied weights are the merged weights

    def select(self, backbone):
        return param_leaves(backbone)


@register
class TopKFinetune(CopiedModules):
    method = "top_k"
    trains_backbone = True
    merge_refusal = None
    settings = {"top_k": AT_LEAST_ONE}

    def select(self, backbone):
        a, k = self.arch, self.config.top_k
        if not 1 <= k <= a.num_layers:
            raise ValueError(f"top_k={k} must be in 1..{a.num_layers} (the backbone's layers)")
        chosen = []
        for i in range(a.num_layers - k, a.num_layers):
            chosen += param_leaves(backbone, a.block_path(i))
        # final norm(s): parameterised modules outside the blocks that are not embeddings
        head = backbone.get_output_embeddings()
        for path, m in param_leaves(backbone):
            inside = path.startswith(a.layers_path + ".")
            if not inside and not isinstance(m, nn.Embedding) and m is not head:
                chosen.append((path, m))
        chosen.append((next(p for p, m in backbone.named_modules() if m is head), head))
        return chosen
