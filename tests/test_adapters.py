"""Invariants of the shared-backbone adapter system (docs/invariants.md #1, #2, #3, #4, #5 and #8)."""
from __future__ import annotations

import hashlib

import pytest
import torch

from align.adapters import AdapterConfig
from align.adapters.peft_format import FingerprintMismatch, load_adapter, save_adapter
from align.generation import sample
from tests.conftest import load

FAMILIES = ["llama", "gpt2", "qwen2"]
METHODS = {
    "lora": AdapterConfig(method="lora", r=4, alpha=8),
    "lora_mlp_regex": AdapterConfig(method="lora", r=2, target_modules=r".*\.(up_proj|c_fc|down_proj|c_proj)"),
    "bottleneck": AdapterConfig(method="bottleneck", bottleneck_size=8),
    "pfeiffer": AdapterConfig(method="bottleneck", variant="pfeiffer", bottleneck_size=8),
    "prefix": AdapterConfig(method="prefix", num_virtual_tokens=3),
    "prefix_mlp": AdapterConfig(method="prefix", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
}
ZERO_INIT = ["lora", "lora_mlp_regex", "bottleneck", "pfeiffer"]


def batch(tok, texts=("the happy dog sings a song", "bad rain"), side="right"):
    tok.padding_side = side
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def backbone_hash(model):
    h = hashlib.sha256()
    for n, t in sorted(model.backbone.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


def randomize(aset, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ZERO_INIT)
def test_zero_initialised_role_reproduces_backbone_exactly(tiny_paths, family, method):
    model, tok = load(tiny_paths[family])
    ids, mask = batch(tok)
    base = model(ids, mask, role="base").logits
    raw = model.backbone(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(base[real], raw[real], atol=1e-5, rtol=0)
    model.add_adapter("a", METHODS[method])
    model.add_role("a", ["a"])
    assert torch.equal(model(ids, mask, role="a").logits, base)


def assert_training_changes_only_set_a(model, ids, mask, others=("base", "b")):
    """Train adapter set ``a`` (role ``a``) for three steps and check docs/invariants.md #1 and #2:
    gradients reach a's tensors and nothing else, the backbone and every other set are unchanged
    (so are the ``others`` roles' outputs), and role ``a``'s output moved away from the backbone's."""
    before = {r: model(ids, mask, role=r).logits.clone() for r in others}
    h0 = backbone_hash(model)
    states = {n: {k: v.clone() for k, v in s.state_dict().items()} for n, s in model.adapters.items()}
    params = model.set_trainable(["a"])
    assert params and all(p.requires_grad for p in model.adapters["a"].parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(ids, mask, role="a")
        loss = out.logits.logsumexp(-1).mean() - out.logits[..., 5].mean()
        opt.zero_grad()
        loss.backward()
        # gradients reach the active role's trainable tensors and nothing else
        # (with LoRA's B = 0, A's first gradient is exactly zero, so check the set as a whole)
        grads = [p.grad for p in model.adapters["a"].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adapters.a."))
        opt.step()
    model.eval()
    assert backbone_hash(model) == h0                      # invariant 1
    for name, state in states.items():                     # invariant 2
        changed = any(not torch.equal(v, state[k]) for k, v in model.adapters[name].state_dict().items())
        assert changed == (name == "a"), name
    for r in others:
        assert torch.equal(model(ids, mask, role=r).logits, before[r])
    assert not torch.allclose(model(ids, mask, role="a").logits, model(ids, mask, role="base").logits)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_changes_only_the_active_role(tiny_llama, method):
    model, tok = load(tiny_llama)
    ids, mask = batch(tok)
    model.add_adapter("a", METHODS[method])
    model.add_adapter("b", METHODS[method])
    randomize(model.adapters["b"], seed=1)
    model.add_role("a", ["a"])
    model.add_role("b", ["b"])
    model.add_head("v")
    model.add_role("v", ["b"], head="v")
    assert_training_changes_only_set_a(model, ids, mask)


def assert_cached_generation_equals_uncached(model, tok, ids, mask, role: str, max_new_tokens: int,
                                             atol: float = 1e-5):
    """Greedy decoding with the KV cache picks the same tokens, with the same log-probs, as
    re-running the whole sequence at every step (virtual tokens and left padding included).
    ``atol``: 1e-5 on the tiny models; a 30-layer real model accumulates float32 rounding
    differently along the two paths (up to ~3e-5 seen on SmolLM2)."""
    from align.tokens import specials
    kw = dict(role=role, max_new_tokens=max_new_tokens, greedy=True, stop_token_id=specials(tok).stop_ids,
              pad_token_id=tok.pad_token_id)
    cached = sample(model, ids, mask, use_cache=True, **kw)
    uncached = sample(model, ids, mask, use_cache=False, **kw)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logprobs, uncached.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_generation_equals_uncached_greedy(tiny_paths, family, method):
    model, tok = load(tiny_paths[family])
    model.add_adapter("a", METHODS[method])
    randomize(model.adapters["a"])
    model.add_role("a", ["a"])
    ids, mask = batch(tok, side="left")
    assert_cached_generation_equals_uncached(model, tok, ids, mask, "a", max_new_tokens=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_gives_the_same_logits_as_no_padding(tiny_paths, family):
    """Positions follow the mask, so left padding is invisible even for absolute positions (gpt2)."""
    model, tok = load(tiny_paths[family])
    model.add_adapter("p", METHODS["prefix"])
    randomize(model.adapters["p"])
    model.add_role("p", ["p"])
    ids, mask = batch(tok, side="left")
    for role in ("base", "p"):
        padded = model(ids, mask, role=role).logits[1][mask[1].bool()]
        alone_ids = ids[1][mask[1].bool()][None]
        alone = model(alone_ids, torch.ones_like(alone_ids), role=role).logits[0]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameter_count_matches_closed_form(tiny_paths, family, method):
    model, _ = load(tiny_paths[family])
    aset = model.add_adapter("a", METHODS[method])
    assert aset.num_params() == aset.expected_num_params() > 0
    a = model.arch
    if method == "lora":  # by hand: q and v projections of every layer (GQA shrinks v)
        q = (a.hidden_size + a.num_heads * a.head_dim)
        v = (a.hidden_size + a.num_kv_heads * a.head_dim)
        per_layer = 4 * (q + v) if family != "gpt2" else 4 * (a.hidden_size + 3 * a.hidden_size)
        assert aset.num_params() == a.num_layers * per_layer
    if method == "prefix":
        assert aset.num_params() == 3 * a.num_layers * 2 * a.num_kv_heads * a.head_dim


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_and_stacking(tiny_llama, tmp_path, method):
    model, tok = load(tiny_llama)
    ids, mask = batch(tok)
    model.add_adapter("sft", METHODS[method])
    randomize(model.adapters["sft"])
    model.add_role("sft", ["sft"])
    want = model(ids, mask, role="sft").logits
    save_adapter(model, "sft", tmp_path / "sft")
    fresh, _ = load(tiny_llama)
    load_adapter(fresh, "sft", tmp_path / "sft")
    fresh.add_role("sft", ["sft"])
    torch.testing.assert_close(fresh(ids, mask, role="sft").logits, want, atol=1e-6, rtol=0)
    # a trainable copy stacked as the policy starts equal to the reference
    fresh.copy_adapter("sft", "policy")
    fresh.add_role("policy", ["policy"])
    torch.testing.assert_close(fresh(ids, mask, role="policy").logits, want, atol=1e-6, rtol=0)
    saved = sum(1 for _ in (tmp_path / "sft").iterdir())
    assert saved in (2, 3) and not list((tmp_path / "sft").glob("*.bin"))


def test_identical_content_gives_byte_identical_safetensors(tiny_llama, tmp_path):
    """Issue 16: safetensors keeps ``__metadata__`` in a Rust HashMap, so the same adapter came
    out as different files run to run (and call to call). The bytes depend only on content now."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from align.checkpoint import save_safetensors
    t = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(4, dtype=torch.bfloat16),
         "c": torch.tensor([1, 2], dtype=torch.int64)}
    meta = {"format": "pt", "align_method": "lora", "align_fingerprint": "abc123", "note": 'caf\u00e9 "q"',
            "z": "1", "m": "2"}
    for i, order in enumerate([sorted(meta), sorted(meta, reverse=True), ["m", "format", "z", "note",
                                                                            "align_method", "align_fingerprint"]]):
        tensors = {k: t[k] for k in (sorted(t) if i % 2 else sorted(t, reverse=True))}
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata={k: meta[k] for k in order})
    files = [(tmp_path / f"{i}.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    back = load_file(tmp_path / "0.safetensors")
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == meta
    # the same adapter saved again and again: one file
    model, _ = load(tiny_llama)
    model.add_adapter("sft", METHODS["lora"])
    randomize(model.adapters["sft"])
    for i in range(8):
        save_adapter(model, "sft", tmp_path / f"sft{i}")
    blobs = {(tmp_path / f"sft{i}" / "adapter_model.safetensors").read_bytes() for i in range(8)}
    assert len(blobs) == 1


def test_adapter_refuses_a_different_backbone(tiny_paths, tmp_path):
    model, _ = load(tiny_paths["llama"])
    model.add_adapter("sft", METHODS["lora"])
    save_adapter(model, "sft", tmp_path / "sft")
    other, _ = load(tiny_paths["qwen2"])
    with pytest.raises(FingerprintMismatch, match=model.fingerprint):
        load_adapter(other, "sft", tmp_path / "sft")


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prefix", "ia3", "prompt", "ptuning", "llama_adapter",
                                    "full", "top_k"])
def test_a_method_declares_whether_it_trains_backbone_weights_and_that_is_what_it_does(tiny_llama, method):
    """``AdapterSet.trains_backbone`` (what the quantized-backbone refusal reads) is true exactly
    for the methods whose trainable tensors start as copies of backbone weights."""
    from align.adapters.base import METHODS as REGISTERED
    assert set(REGISTERED) == {"lora", "bottleneck", "prefix", "ia3", "prompt", "ptuning", "llama_adapter", "full",
                               "top_k"}
    model, _ = load(tiny_llama)
    model.add_adapter("a", AdapterConfig(method=method))
    backbone = [p.detach() for p in model.backbone.parameters() if p.dim() == 2]
    copies = [p for p in model.adapters["a"].parameters()
              if any(p.shape == w.shape and torch.equal(p.detach(), w) for w in backbone)]
    assert REGISTERED[method].trains_backbone == bool(copies), (method, len(copies))
