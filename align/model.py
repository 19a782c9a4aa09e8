"""One frozen backbone, many roles.

``AlignModel`` holds the Hugging Face backbone once, the named adapter sets, the scalar heads and
the roles. A role is a stack of adapter sets plus an optional head::

    model = AlignModel(backbone)
    model.add_adapter("sft", AdapterConfig(method="lora", r=8))
    model.add_role("reference", adapters=["sft"])
    model.copy_adapter("sft", "policy"); model.add_role("policy", adapters=["policy"])
    model.add_head("value"); model.add_adapter("value", cfg); model.add_role("value", ["value"], head="value")
    out = model(input_ids, attention_mask, role="policy")      # out.logits
    with model.use("reference"): ...                            # or as a context

Activating a role only changes which sets the hook dispatchers apply and which head reads the
final hidden state; the backbone is never copied or modified (docs/invariants.md #1 and #2).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
import torch.nn as nn

from align import attention
from align.adapters.base import AdapterConfig, AdapterSet, create_adapter_set
from align.arch import attn_implementation_problem, detect_arch, longrope_switch
from align.backbone import fingerprint, freeze
from align.heads import ScalarHead


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """The forward keyword for the KV cache: ``cache`` in newer transformers (where
    ``past_key_values`` is deprecated, to go in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def distinct_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ``key`` [B, N]: (the first row index of each, each row's index among
    them), so ``key[first][inverse]`` equals ``key``."""
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    b = key.shape[0]
    first = torch.full((uniq.shape[0],), b, dtype=torch.long, device=key.device)
    return first.scatter_reduce(0, inverse, torch.arange(b, device=key.device), "amin"), inverse


@dataclass(frozen=True)
class Role:
    name: str
    adapters: tuple[str, ...] = ()
    head: str | None = None


class ModelOutput(NamedTuple):
    """What ``AlignModel.forward`` returns. A named tuple because DeepSpeed ZeRO-3 looks for a
    module's output tensors in tuples, lists and dicts only: in any other type it cannot hook the
    model's backward, and the adapter tensors registered with the model (``register_role_tensors``)
    would not be gathered again for it. None where not computed."""
    logits: torch.Tensor | None = None   # [B, T, V], or at ``logits_at``
    values: torch.Tensor | None = None   # [B, T] the active head at every position
    hidden: torch.Tensor | None = None   # [B, T, H] final hidden state
    cache: object | None = None
    mask: torch.Tensor | None = None     # the full 2-D mask the cache now covers (virtual tokens incl.)


class AlignModel(nn.Module):
    def __init__(self, backbone: nn.Module, attn_implementation: str = "sdpa"):
        """``attn_implementation`` (``model.attn_implementation``): the transformers attention
        function (sdpa | eager | flex_attention) that align's attention function delegates the
        core attention to (align/attention.py)."""
        super().__init__()
        if (problem := attn_implementation_problem(attn_implementation)) is not None:
            raise ValueError(f"model.attn_implementation={attn_implementation!r}: {problem}")
        self.attn_implementation = attn_implementation
        freeze(backbone)
        self.backbone = backbone
        self.arch = detect_arch(backbone)
        self.fingerprint = fingerprint(backbone)
        # token ids align added to the vocabulary (a PAD of its own): masked out of every
        # distribution, so their (zero) embedding rows never reach a sampled token or a log-prob
        self.masked_token_ids = tuple(getattr(backbone, "_align_masked_ids", ()))
        self.final_logit_softcapping = getattr(backbone.config.get_text_config(), "final_logit_softcapping", None)
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.roles: dict[str, Role] = {"base": Role("base")}
        self.active: tuple[str, ...] = ()
        self.active_head: str | None = None
        self._dispatch: dict[tuple[str, str], list] = {}
        self._handles = []
        self.passes = 0   # backbone passes over whole sequences (not sampling steps): metrics' passes per step
        # a shared-prompt pass (``_shared_trunk``): each layer's prompt keys/values, recorded by
        # align's attention function in the prompt pass and put in front of the rows' own in the rest
        self.record_kv: dict | None = None
        self.prompt_kv: dict | None = None
        backbone.set_attn_implementation(attention.register())
        for i in range(self.arch.num_layers):
            attn = backbone.get_submodule(self.arch.attn_path(i))
            # read by align.attention for prefix key/values; set in __dict__ so it is not
            # registered as a submodule (that would make the model contain itself)
            attn.__dict__["_align_owner"] = self
            if getattr(attn, "layer_idx", None) is None:
                attn.layer_idx = i

    # ----------------------------------------------------------------- adapter sets and roles
    def add_adapter(self, name: str, config: AdapterConfig) -> AdapterSet:
        if name in self.adapters:
            raise ValueError(f"adapter set {name!r} already exists")
        aset = create_adapter_set(name, config, self.backbone, self.arch)
        dev = next(self.backbone.parameters()).device
        aset.to(dev)
        self.adapters[name] = aset
        for point, fn in aset.hook_points().items():
            self._dispatch.setdefault(point, [])
            if len(self._dispatch[point]) == 0:
                self._install(point)
            self._dispatch[point].append((name, fn))
        return aset

    def copy_adapter(self, src: str, dst: str) -> AdapterSet:
        """A new set ``dst`` with the method, config and current values of ``src``."""
        aset = self.add_adapter(dst, copy.deepcopy(self.adapters[src].config))
        aset.copy_from(self.adapters[src])
        return aset

    def add_head(self, name: str, init: str = "reward") -> ScalarHead:
        head = ScalarHead(self.arch.hidden_size, init=init).to(next(self.backbone.parameters()).device)
        self.heads[name] = head
        return head

    def add_role(self, name: str, adapters: Iterable[str] = (), head: str | None = None) -> Role:
        adapters = tuple(adapters)
        for a in adapters:
            if a not in self.adapters:
                raise KeyError(f"role {name!r}: no adapter set {a!r} (have {list(self.adapters)})")
        if head is not None and head not in self.heads:
            raise KeyError(f"role {name!r}: no head {head!r} (have {list(self.heads)})")
        role = Role(name, adapters, head)
        self.roles[name] = role
        return role

    def set_trainable(self, names: Iterable[str]) -> list[nn.Parameter]:
        """Make exactly the named adapter sets / heads trainable; everything else is frozen."""
        names = set(names)
        unknown = names - set(self.adapters) - set(self.heads)
        if unknown:
            raise KeyError(f"no adapter set or head named {sorted(unknown)}")
        for coll in (self.adapters, self.heads):
            for n, m in coll.items():
                m.requires_grad_(n in names)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never runs dropout
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of storing them.

        Gradients still flow through the frozen backbone into the adapters. transformers only
        checkpoints layers in training mode, but the backbone stays in eval mode (no dropout), so
        ``forward`` flags just the layer modules as training around grad-enabled, cache-free calls.
        The recomputation runs under the role that was active in the forward (``context_fn``):
        a multi-role forward followed by one backward recomputes each role's layers with its own
        adapters."""
        kwargs = {"use_reentrant": False, "context_fn": self._recompute_context}
        if hasattr(self.backbone, "activation_checkpointing_enable"):  # its name since transformers 5.2x
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._ckpt_layers = [m for m in self.backbone.modules() if getattr(m, "gradient_checkpointing", False)]
        if not self._ckpt_layers:
            raise ValueError(f"{type(self.backbone).__name__} does not support gradient checkpointing")

    def _recompute_context(self):
        saved = (self.active, self.active_head, None, self.prompt_kv)   # nothing is recorded again

        @contextlib.contextmanager
        def recompute():
            prev = (self.active, self.active_head, self.record_kv, self.prompt_kv)
            self.active, self.active_head, self.record_kv, self.prompt_kv = saved
            try:
                yield
            finally:
                self.active, self.active_head, self.record_kv, self.prompt_kv = prev
        return contextlib.nullcontext(), recompute()

    @contextlib.contextmanager
    def _checkpointing(self, active: bool):
        layers = getattr(self, "_ckpt_layers", None) if active else None
        if not layers:
            yield
            return
        was = [m.training for m in layers]
        for m in layers:
            m.training = True  # the layer only: its dropout submodules stay in eval mode
        try:
            yield
        finally:
            for m, w in zip(layers, was):
                m.training = w

    def activate(self, role: str) -> Role:
        """Make ``role`` the active one until changed (``use`` is the scoped form)."""
        r = self.roles[role]
        self.active, self.active_head = r.adapters, r.head
        return r

    @contextlib.contextmanager
    def use(self, role: str):
        prev = (self.active, self.active_head)
        r = self.roles[role]
        self.active, self.active_head = r.adapters, r.head
        try:
            yield r
        finally:
            self.active, self.active_head = prev

    # ----------------------------------------------------------------- hook dispatch
    def _install(self, point: tuple[str, str]) -> None:
        path, kind = point
        module = self.backbone.get_submodule(path)
        entries = self._dispatch[point]

        def live():
            if not self.active:
                return []
            # stack order: the role's adapter order
            return [fn for a in self.active for (n, fn) in entries if n == a]

        if kind == "out":
            def hook(mod, args, kwargs, output):
                fns = live()
                if not fns:
                    return None
                x = args[0] if args else kwargs.get("hidden_states")
                if isinstance(output, tuple):
                    out0 = output[0]
                    for fn in fns:
                        out0 = fn(x, out0)
                    return (out0,) + tuple(output[1:])
                for fn in fns:
                    output = fn(x, output)
                return output
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        elif kind == "in":
            def pre_hook(mod, args, kwargs):
                fns = live()
                if not fns:
                    return None
                if args:
                    x = args[0]
                    for fn in fns:
                        x = fn(x)
                    return (x,) + tuple(args[1:]), kwargs
                x = kwargs["hidden_states"]
                for fn in fns:
                    x = fn(x)
                return args, {**kwargs, "hidden_states": x}
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            raise ValueError(f"unknown hook kind {kind!r}")

    def live_sets(self) -> list[AdapterSet]:
        return [self.adapters[a] for a in self.active]

    def attention_extra(self, layer_idx: int, batch_size: int):
        extras = [e for s in self.live_sets() if (e := s.attention_extra(layer_idx, batch_size)) is not None]
        if not extras:
            return None
        if len(extras) == 1:
            return extras[0]
        return torch.cat([e[0] for e in extras], dim=2), torch.cat([e[1] for e in extras], dim=2)

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                role: str | None = None, cache=None, past_mask: torch.Tensor | None = None,
                logits: bool | None = None, segment_ids: torch.Tensor | None = None,
                roles: tuple[str, ...] | None = None, logits_at: slice | torch.Tensor | None = None,
                shared_prompt: int | None = None):
        """Run the backbone under ``role`` (or the role already active).

        ``attention_mask`` is the 2-D mask of ``input_ids`` (1 = real token; left or right padding).
        For incremental decoding pass ``cache`` (a transformers ``DynamicCache``) and ``past_mask``,
        the ``mask`` of the previous output. Virtual tokens (prompt tuning) are prepended at
        prefill only and are never part of the returned tensors. ``segment_ids`` [B, T] (packed
        sequences, no cache) restricts attention to tokens of the same segment and restarts
        positions at each segment. ``logits_at`` (a slice of positions, e.g. ``slice(-1, None)`` at
        prefill or the response positions when scoring; or a bool [B, T] selection, giving [N, V])
        computes logits only there: with a 50k+
        vocabulary the [B, T, V] logits of every prompt position would dominate memory.

        ``roles``: several roles over the same inputs in one module call (DDP / DeepSpeed see a
        single forward per backward), ``{role: ModelOutput}``; roles with the same adapter stack
        (a value head on the policy's adapters) share one pass of the backbone.
        ``shared_prompt=q``: rows whose first ``q`` columns (ids and mask) are equal (a group of
        samples of one prompt) run those columns once and continue from their keys/values
        (``shared_prompt_plan``); the same results as the unshared pass up to float rounding.
        """
        if roles is not None:
            return self._forward_roles(input_ids, attention_mask, tuple(roles), logits, segment_ids, logits_at,
                                       shared_prompt)
        if role is not None:
            with self.use(role):
                return self.forward(input_ids, attention_mask, cache=cache, past_mask=past_mask,
                                    logits=logits, segment_ids=segment_ids, logits_at=logits_at,
                                    shared_prompt=shared_prompt)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.long)
        plan = None
        if shared_prompt is not None and cache is None and segment_ids is None:
            plan = self.shared_prompt_plan(input_ids, attention_mask, shared_prompt)
        if cache is None:
            self.passes += 1
        if plan is not None:
            hidden, full_mask = self._shared_trunk(input_ids, attention_mask, shared_prompt, *plan)
            cache_out = None
        else:
            hidden, cache_out, full_mask = self._trunk(input_ids, attention_mask, cache, past_mask, segment_ids)
        return self._outputs(hidden, logits, logits_at, cache_out, full_mask)

    def _forward_roles(self, input_ids, attention_mask, roles, logits, segment_ids, logits_at, shared_prompt):
        """``forward(roles=...)``: one backbone pass per distinct adapter stack; each head of a
        stack reads that pass's hidden state."""
        res = {}
        for r in roles:
            if r in res:
                continue
            stack = self.roles[r].adapters
            same = [s for s in roles if self.roles[s].adapters == stack]
            bare_role = next((s for s in same if self.roles[s].head is None), None)
            want = logits if logits is not None else (bare_role is not None)
            ran = bare_role or r
            out = self.forward(input_ids, attention_mask, role=ran, logits=want, segment_ids=segment_ids,
                               logits_at=logits_at, shared_prompt=shared_prompt)
            for s in same:
                head = self.roles[s].head
                lm = out.logits if (logits if logits is not None else head is None) else None
                values = out.values if s == ran else self.heads[head](out.hidden) if head is not None else None
                res[s] = out._replace(logits=lm, values=values)
        return res

    def _trunk(self, input_ids, attention_mask, cache, past_mask, segment_ids):
        """The backbone under the active role: final hidden states (virtual tokens dropped), the
        cache (when one is given) and the full 2-D mask it covers."""
        b = input_ids.shape[0]
        embed = self.backbone.get_input_embeddings()
        embeds = embed(input_ids)
        n_virtual = 0
        if past_mask is None:  # prefill: virtual tokens go in front
            virtual = [v for s in self.live_sets() if (v := s.virtual_embeddings(b, embed)) is not None]
            if virtual:
                virtual = torch.cat(virtual, dim=1).to(embeds.dtype)
                n_virtual = virtual.shape[1]
                embeds = torch.cat([virtual, embeds], dim=1)
                attention_mask = torch.cat(
                    [attention_mask.new_ones(b, n_virtual), attention_mask], dim=1)
            full_mask = attention_mask
        else:
            full_mask = torch.cat([past_mask, attention_mask], dim=1)
        if segment_ids is not None and (cache is not None or n_virtual):
            raise ValueError("segment_ids (packing) is for training forwards without cache or virtual tokens")
        mask4, positions = self._mask_and_positions(full_mask, embeds.shape[1], segment_ids)
        with self._checkpointing(torch.is_grad_enabled() and cache is None):
            out = self.backbone.base_model(
                inputs_embeds=embeds, attention_mask=mask4[:, None], position_ids=positions,
                use_cache=cache is not None, **{_cache_kwarg(type(self.backbone.base_model)): cache})
        return (out.last_hidden_state[:, n_virtual:], _output_cache(out) if cache is not None else None,
                full_mask)

    def shared_prompt_plan(self, input_ids, attention_mask, q: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For ``forward(shared_prompt=q)``: (one row per distinct prompt, each row's prompt index),
        or None where sharing saves nothing or is not exact: no two rows share their first ``q``
        columns, nothing follows them, or the backbone's RoPE changes with the length
        (longrope: a shorter prefill would rotate the prompt's keys differently). Where every
        backbone pass is a collective (ZeRO-3, FSDP2), only those settings decide, never the rows,
        so every process makes the same calls (a rank whose rows all differ still runs prompt and
        continuation as two passes)."""
        b, t = input_ids.shape
        if not 0 < q < t:
            return None
        if longrope_switch(self.backbone) is not None:
            return None
        collective = self.sharded()
        if b < 2 and not collective:
            return None
        first, inverse = distinct_rows(torch.cat([input_ids[:, :q], attention_mask[:, :q]], 1))
        if len(first) == b and not collective:
            return None
        return first, inverse

    def sharded(self) -> str | None:
        """How the backbone's weights are partitioned over processes ("zero3" | "fsdp2", where each
        pass gathers them collectively), or None."""
        from align.fsdp import is_sharded
        for p in self.parameters():   # not the embedding alone: a wrapping may leave it whole
            if hasattr(p, "ds_id"):
                return "zero3"
            if is_sharded(p):
                return "fsdp2"
        return None

    def _shared_trunk(self, input_ids, attention_mask, q, first, inverse):
        """The prompt columns of the rows ``first`` once, recording each layer's keys/values; those
        (and the hidden states) copied to every row of their prompt (``inverse``); the rest of each
        row continued with them in front of its own (align's attention function: ``prompt_kv``).
        Autograd sums the copies' gradients into the shared prompt pass. No cache object is
        involved, so gradient checkpointing (which drops caches and recomputes each layer in the
        backward, under the recorded keys/values: ``_recompute_context``) applies to both parts."""
        self.record_kv = {}
        try:
            hp, _, pmask = self._trunk(input_ids[first, :q], attention_mask[first, :q], None, None, None)
            self.prompt_kv = {i: (k[inverse], v[inverse]) for i, (k, v) in self.record_kv.items()}
            self.record_kv = None
            hc, _, full_mask = self._trunk(input_ids[:, q:], attention_mask[:, q:], None, pmask[inverse], None)
        finally:
            self.record_kv = self.prompt_kv = None
        return torch.cat([hp[inverse], hc], 1), full_mask

    def _outputs(self, hidden, logits, logits_at, cache, full_mask) -> ModelOutput:
        """The LM head's logits (where asked) and the active head's values on ``hidden``."""
        head = self.active_head
        want_logits = logits if logits is not None else head is None
        lm = None
        if want_logits:
            if logits_at is None:
                lm = self.lm_logits(hidden)
            elif isinstance(logits_at, torch.Tensor):  # a bool [B, T] selection: logits [N, V]
                lm = self.lm_logits(hidden[logits_at])
            else:
                lm = self.lm_logits(hidden[:, logits_at])
        return ModelOutput(logits=lm, values=self.heads[head](hidden) if head is not None else None,
                           hidden=hidden, cache=cache, mask=full_mask)

    def _mask_and_positions(self, full_mask: torch.Tensor, q_len: int, segment_ids: torch.Tensor | None):
        """The [B, Q, K] boolean attention mask (True = attend) and the [B, Q] positions of the
        queries, which are the last ``q_len`` of the ``full_mask`` columns."""
        kv_len, device = full_mask.shape[1], full_mask.device
        # Positions count real tokens only (correct under left padding for absolute-position
        # models), shifted by the prefix length as peft does for prefix tuning.
        shift = sum(s.num_prefix_positions() for s in self.live_sets())
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, kv_len - q_len:] + shift
        q_abs = torch.arange(kv_len - q_len, kv_len, device=device)
        k_idx = torch.arange(kv_len, device=device)
        causal = k_idx[None, :] <= q_abs[:, None]
        allowed = causal[None] & full_mask.bool()[:, None, :]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
            start = torch.cat([torch.ones_like(segment_ids[:, :1], dtype=torch.bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)
            idx = torch.arange(q_len, device=device).expand_as(segment_ids)
            seg_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
            positions = idx - seg_start + shift
        # Padding rows attend to themselves so no softmax row is empty (avoids NaN); nothing
        # real ever attends to them.
        return allowed | (k_idx[None, :] == q_abs[:, None])[None], positions

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden`` [..., H], with align's added tokens (PAD) masked to a large
        negative logit (finite, so softmax gives them exactly 0 and entropies stay finite)."""
        logits = self.backbone.get_output_embeddings()(hidden)
        if self.final_logit_softcapping is not None:  # Gemma's cap * tanh(logits / cap), as its forward
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if self.masked_token_ids:
            idx = torch.tensor(self.masked_token_ids, device=logits.device)
            logits = logits.index_fill(-1, idx, -1e4)
        return logits

    # ----------------------------------------------------------------- introspection
    def backbone_num_params(self) -> int:
        """Parameters of the backbone as in its checkpoint (a packed 4-bit tensor counts the
        weights it holds, not its bytes)."""
        def numel(p):
            qs = getattr(p, "quant_state", None)
            return qs.shape.numel() if qs is not None and hasattr(qs, "shape") else p.numel()
        return sum(numel(p) for p in self.backbone.parameters())

    def role_num_params(self, role: str) -> int:
        r = self.roles[role]
        n = sum(self.adapters[a].num_params() for a in r.adapters)
        return n + (sum(p.numel() for p in self.heads[r.head].parameters()) if r.head else 0)
