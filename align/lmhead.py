"""Log-probabilities of given tokens straight from hidden states, without a [N, V] logits tensor
kept for the backward pass.

With a 49k-262k vocabulary the logits of the response positions, their temperature-scaled copy
and the softmax that autograd keeps for the backward are the largest tensors of a policy update
(with gradient checkpointing the decoder layers keep only their inputs). ``token_logprobs``
computes, a chunk of positions at a time, the logits, ``log p(token)`` and (when asked) the
entropy, and for the backward only the gradient of ``log p(token)`` with respect to the hidden
state::

    d log p_t / d h_t = (W[token] - sum_v p_v W[v]) / T          (frozen head W, temperature T)

which is [N, H] instead of [N, V] (H = 576 against V = 49,152 on SmolLM2). Its cost is the
[c, V] x [V, H] product the ordinary backward computes anyway (grad of logits times W), done in
the forward; the backward multiplies it by the incoming gradient. No recomputation, no extra
GEMM. A Gemma-style final soft-cap (``cap * tanh(x / cap)``) enters through its derivative
``1 - tanh^2``; align's masked tokens (a constant logit) have none.

Only for a head that is a plain, frozen ``nn.Linear`` whose weight is an ordinary tensor held
whole by this process: a head an adapter targets (``lm_head`` in a LoRA's modules), a trainable
one (``full`` fine-tuning), a quantized one, or one sharded by ZeRO-3 or FSDP2 takes the ordinary
path (``fused_head`` says which), where the model computes the logits inside its forward as before. See docs/memory.md.
"""
from __future__ import annotations

import torch
from torch import nn

from align.rl.functional import logprobs_from_logits

# positions per chunk: about 16 MiB of float32 logits per chunk on SmolLM2 (85 positions x 49,152)
CHUNK_BYTES = 16 * 2**20


def bare(model):
    """The AlignModel inside a DDP / DeepSpeed wrapper (``.module``), or ``model`` itself."""
    while hasattr(model, "module") and not hasattr(model, "roles"):
        model = model.module
    return model


def fused_head(model) -> nn.Linear | None:
    """The model's LM head when ``token_logprobs`` can use it: a frozen ``nn.Linear`` without hooks
    (no adapter targets it) with an ordinary (not quantized, not DTensor, not ZeRO-3-partitioned)
    weight; else None."""
    head = model.backbone.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None   # an adapter on the head (a hook) must run: the module's own forward
    w = head.weight
    if w.requires_grad or type(w.data) is not torch.Tensor or hasattr(w, "ds_id") or w.dim() != 2 or w.numel() == 0:
        return None
    return head


class _HeadLogprobs(torch.autograd.Function):
    """log p(tokens) [N] (and entropy [N], no gradient) from hidden [N, H] through a frozen head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, cap, masked, want_entropy):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_entropy else None
        jac = torch.empty_like(hidden) if need_grad else None
        step = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        for s in range(0, n, step):
            h, tok = hidden[s:s + step], tokens[s:s + step]
            x = nn.functional.linear(h, weight, bias).float()
            y = None
            if cap is not None:
                y = torch.tanh(x / cap)
                x = y * cap
            if masked is not None:
                x.index_fill_(-1, masked, -1e4)
            logp = x.div_(temperature)
            logp.sub_(torch.logsumexp(logp, -1, keepdim=True))   # log softmax, in place
            lp[s:s + step] = logp.gather(-1, tok[:, None]).squeeze(-1)
            if need_grad or want_entropy:
                p = logp.exp()
                if want_entropy:   # -sum p log p; p = 0 entries (underflow) add 0
                    ent[s:s + step] = -torch.where(p > 0, p * logp, 0.0).sum(-1)
                del logp
                if need_grad:
                    g = p.neg_()
                    g.scatter_add_(-1, tok[:, None], torch.ones_like(tok[:, None], dtype=g.dtype))
                    if y is not None:
                        g.mul_(1 - y * y)
                    if masked is not None:
                        g.index_fill_(-1, masked, 0.0)
                    jac[s:s + step] = (g.to(weight.dtype) @ weight).div_(temperature).to(hidden.dtype)
        if need_grad:
            ctx.save_for_backward(jac)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        (jac,) = ctx.saved_tensors
        return (grad_lp.to(jac.dtype)[:, None] * jac, None, None, None, None, None, None, None)


def token_logprobs(model, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(lm_logits(hidden) / temperature)`` at ``tokens`` ([..., H] and [...] -> [...]
    float32) and, with ``entropy``, the entropy of that distribution (no gradient). Equal to
    ``logprobs_from_logits(model.lm_logits(hidden), tokens, temperature)`` (and
    ``entropy_from_logits``), values and gradients, without keeping [..., V] tensors; ``model``
    must pass ``fused_head``."""
    head = fused_head(model)
    if head is None:
        raise ValueError("token_logprobs needs a frozen, unsharded nn.Linear LM head (fused_head)")
    shape = tokens.shape
    masked = (torch.tensor(model.masked_token_ids, device=hidden.device) if model.masked_token_ids else None)
    lp, ent = _HeadLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                  tokens.reshape(-1).long(), float(temperature), model.final_logit_softcapping,
                                  masked, entropy)
    return lp.view(shape), (ent.view(shape) if ent is not None else None)


def logprobs_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor,
                targets: torch.Tensor, temperature: float = 1.0, **forward) -> torch.Tensor:
    """[N] log-probs of ``targets`` at the positions ``sel`` (a bool [B, T] selection, in its
    row-major order) of one forward of ``model`` (an AlignModel, or its DDP / DeepSpeed wrapper;
    ``forward``: e.g. ``role``, ``segment_ids``): from the hidden states through ``token_logprobs``
    where the head allows, else from the logits computed at ``sel`` only."""
    inner = bare(model)
    if fused_head(inner) is not None:
        out = model(input_ids, attention_mask, logits=False, **forward)
        return token_logprobs(inner, out.hidden[sel], targets, temperature)[0]
    out = model(input_ids, attention_mask, logits=True, logits_at=sel, **forward)
    return logprobs_from_logits(out.logits, targets, temperature)
