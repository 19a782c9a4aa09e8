"""The adapter protocol.

An :class:`AdapterSet` is one named set of parameter-efficient modules of one method (LoRA,
bottleneck, prefix, ...). It never edits the backbone: it declares *hook points* and the model
(``align.model.AlignModel``) installs one dispatcher per point, which applies the contributions of
the sets that the active role stacks, in stack order. Deactivated sets cost nothing.

Hook point kinds (``(module_path, kind) -> fn``):

* ``"out"``   forward hook on a module: ``fn(module_input, output) -> output``. For a block that
  returns a tuple (attention), ``output`` is its first element.
* ``"in"``    forward pre-hook: ``fn(module_input) -> module_input``.

Methods that act inside attention (prefix tuning, LLaMA-Adapter) implement ``attention_extra``;
methods that add virtual tokens to the input (prompt tuning, P-tuning) implement
``virtual_embeddings``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn as nn

from align.arch import Arch
from align.rules import Rule, setting


def held_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """What ``module.state_dict()`` holds (parameters, persistent buffers), read from the module's
    attributes, detached. The same tensors, except under FSDP2, where ``state_dict()`` reshards the
    group and returns each process's shards even while it is gathered (freeing the whole tensors
    read before it); the attributes hold the whole tensors that saving inside
    ``Runtime.gathered`` must write."""
    out = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b.detach()
    return out


@dataclass
class AdapterConfig:
    """One adapter set's method and hyper-parameters.

    The same dataclass is the ``adapter:`` section of every stage config (YAML stays flat:
    ``adapter: {method: lora, r: 8}``), but each method owns its settings: the method class
    declares the fields it reads (``AdapterSet.settings``, with their rules), and :meth:`checks`
    (run by ``align.config.validate``) refuses a field the chosen method does not read when it is
    set away from its default. ``method`` and ``extra`` belong to every method.
    """
    method: str = setting("lora", "lora | bottleneck | prefix | ia3 | prompt | ptuning | llama_adapter | full | top_k")
    # LoRA
    r: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA scaling alpha (scale alpha/r)")
    dropout: float = setting(0.0, "LoRA dropout on the adapter input")
    target_modules: Any = setting(None, "list of module-name suffixes, or one regex string; None = family default")
    use_rslora: bool = setting(False, "scale alpha/sqrt(r) (rank-stabilised LoRA)")
    # bottleneck adapters
    variant: str = setting("houlsby", "houlsby (after attention and MLP) | pfeiffer (after MLP only)")
    bottleneck_size: int = setting(16, "bottleneck adapter width")
    nonlinearity: str = setting("relu", "bottleneck adapter: relu | gelu | silu | tanh")
    init_std: float = setting(1e-2, "bottleneck down-projection init std")
    # prefix / prompt / p-tuning / llama-adapter
    num_virtual_tokens: int = setting(8, "prefix / prompt / p-tuning length; LLaMA-Adapter prompt length")
    prefix_projection: bool = setting(
        False,
        "prefix tuning: train through an MLP reparameterisation (folded away at save)")
    encoder_hidden_size: int = setting(64, "prefix MLP / p-tuning encoder hidden size")
    prompt_init: str = setting("random", "random | sample_vocab | text")
    prompt_init_text: str = setting("", "text for prompt_init=text")
    encoder_type: str = setting("mlp", "p-tuning prompt encoder: mlp | lstm | none")
    adapter_layers: int = setting(2, "LLaMA-Adapter: top L layers")
    # IA3
    feedforward_modules: Any = setting(
        None,
        "IA3: which targets are feed-forward (scaled on the input); None = family default")
    # top_k baseline
    top_k: int = setting(1, "top_k baseline: number of top blocks trained (with the final norm and LM head)")
    extra: dict = setting(help="method-specific extras", factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def checks(self, at: str = "") -> Iterator[str]:
        """Problems of this config for its method: an unknown method, a setting of the method out of
        its range or choices, a field set that the method does not read."""
        cls = METHODS.get(self.method)
        if cls is None:
            yield f"{at}method={self.method!r}: choose one of {', '.join(METHODS)}"
            return
        defaults = AdapterConfig()
        for f in fields(self):
            if f.name in COMMON_SETTINGS:
                continue
            value = getattr(self, f.name)
            if f.name in cls.settings:
                rule = cls.settings[f.name]
                if rule is not None and (problem := rule.problem(value)) is not None:
                    yield f"{at}{f.name}={value!r}: {problem}"
            elif value != getattr(defaults, f.name):
                yield (f"{at}{f.name}={value!r} is not a setting of {self.method}; its settings are "
                       f"{', '.join(cls.settings) or 'none (only method and extra)'}")


COMMON_SETTINGS = ("method", "extra")


def match_target(name: str, targets) -> bool:
    """peft's rule: a string is a full-match regex; a list matches a module-name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class AdapterSet(nn.Module):
    """Base class: one named set of adapter tensors of one method."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None  # the HF peft type when peft has this method
    # The AdapterConfig fields this method reads, each with its rule (align.rules) or None; the
    # others must stay at their defaults (AdapterConfig.checks), as peft has one config per method.
    settings: ClassVar[dict[str, Rule | None]] = {}
    # What the method is, declared here rather than in tables elsewhere:
    trains_backbone: ClassVar[bool] = False   # trains (copies of) backbone weights: refused on int8 / nf4
    # None when its effect is a change of backbone weights that ``align export --format hf`` can merge;
    # otherwise why not (and what to use instead)
    merge_refusal: ClassVar[str | None] = "cannot be merged into the backbone weights"

    def __init__(self, name: str, config: AdapterConfig, arch: Arch):
        super().__init__()
        self.set_name = name
        self.config = config
        self.arch = arch

    # --- what the set contributes ---------------------------------------------------------
    def hook_points(self) -> dict[tuple[str, str], Callable]:
        return {}

    def attention_extra(self, layer_idx: int, batch_size: int):
        """Extra key/value for a layer's attention, or None. See align.attention."""
        return None

    def virtual_embeddings(self, batch_size: int, embed: nn.Embedding) -> torch.Tensor | None:
        """[B, N, hidden] embeddings prepended to the input at prefill, or None."""
        return None

    def num_prefix_positions(self) -> int:
        """Positions the real tokens are shifted by (prefix tuning follows peft: N)."""
        return 0

    # --- bookkeeping -------------------------------------------------------------------------
    def expected_num_params(self) -> int:
        """Closed-form count of trainable parameters (tested against the real count)."""
        raise NotImplementedError

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors needed at inference (training-only reparameterisations folded away)."""
        return held_state_dict(self)

    def copy_from(self, other: "AdapterSet") -> None:
        self.load_state_dict(other.state_dict())

    # --- on-disk format ----------------------------------------------------------------------
    # Methods that exist in HF peft override these four to read and write peft's layout.
    def peft_config(self) -> dict | None:
        """The ``adapter_config.json`` peft would write, or None if peft lacks the method."""
        return None

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as written to ``adapter_model.safetensors`` (peft key names where peft has it)."""
        return self.inference_state_dict()

    def import_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state_dict` onto a set built from the saved config."""
        self.load_state_dict(sd)

    @classmethod
    def config_from_peft(cls, peft_cfg: dict) -> AdapterConfig:
        raise NotImplementedError(f"{cls.method} has no HF peft counterpart")

    def saved_config(self) -> AdapterConfig:
        """The config of what :meth:`export_state_dict` writes (reparameterisations folded)."""
        return self.config


# Filled by @register in the method modules. Importing this module runs align/adapters/__init__.py
# first (it is this module's package), and that imports every method module, so by the time any
# function here runs every method is registered; this module never imports its package back
# (tests/test_imports.py keeps the import graph acyclic).
METHODS: dict[str, type[AdapterSet]] = {}


def register(cls: type[AdapterSet]) -> type[AdapterSet]:
    unknown = set(cls.settings) - {f.name for f in fields(AdapterConfig)}
    if unknown:
        raise TypeError(f"{cls.__name__}.settings names fields AdapterConfig lacks: {sorted(unknown)}")
    METHODS[cls.method] = cls
    return cls


def methods_where(capability: str) -> tuple[str, ...]:
    """The registered methods whose class declares ``capability`` true (``trains_backbone``), or,
    for ``mergeable``, whose ``merge_refusal`` is None. (Importing this module runs
    ``align/adapters/__init__.py`` first, which registers every method.)"""
    if capability == "mergeable":
        return tuple(m for m, c in METHODS.items() if c.merge_refusal is None)
    return tuple(m for m, c in METHODS.items() if getattr(c, capability))


def peft_types() -> dict[str, str]:
    """HF peft type -> method, from the registered methods' ``peft_type`` (one source of truth)."""
    return {cls.peft_type: name for name, cls in METHODS.items() if cls.peft_type}


def create_adapter_set(name: str, config: AdapterConfig, backbone: nn.Module, arch: Arch) -> AdapterSet:
    if config.method not in METHODS:
        raise ValueError(f"adapter.method={config.method!r} is unknown; available: {sorted(METHODS)}")
    return METHODS[config.method](name, config, arch, backbone)
