"""Qwen3 and Gemma-3 (text) on tiny random configs of the real transformers classes (align/demo/tiny.py).

For each family: align's logits with no adapter equal transformers' own forward (left padding
included; for Gemma-3 past the sliding window, so its local and global layers differ), every
adapter method attaches and trains, cached greedy decoding equals a full forward per step, a peft
LoRA gives peft's logits both ways, the backbone fingerprint is stable, and the PPO roles share the
backbone's one copy of its weights. Then what is Gemma-3's own: its attention keywords, final
logit soft-capping, the settings align refuses, and the multimodal checkpoint's text part.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.adapters import AdapterConfig
from align.adapters.base import METHODS as REGISTERED
from align.arch import UnsupportedArchitecture
from align.backbone import (
    checkpoint_fingerprint,
    fingerprint,
    load_backbone,
    load_tokenizer,
)
from align.generation import sample
from align.model import AlignModel
from align.demo.tiny import build_tiny_model, make_tiny, tiny_config
from tests.conftest import load
from tests.test_adapters import assert_cached_generation_equals_uncached, backbone_hash
from tests.test_arch_fused import IDENTITY_AT_INIT
from tests.test_arch_fused import METHODS as FUSED_METHODS

FAMILIES = ["qwen3", "gemma3_text"]
WINDOW = 4  # Gemma-3's local layers (tiny_config's default sliding_window)
LONG = "the quick brown fox jumps over a lazy dog while happy people sing good songs"
TEXTS = (LONG, "bad rain")
# every registered method, small (tests/test_arch_fused.py's), LLaMA-Adapter on both layers
METHODS = {**FUSED_METHODS, "llama_adapter": AdapterConfig(method="llama_adapter", num_virtual_tokens=3,
                                                            adapter_layers=2)}


@pytest.fixture(scope="module")
def paths(tiny_paths):
    return {f: tiny_paths[f] for f in FAMILIES}


def left_padded(tok, texts=TEXTS):
    tok.padding_side = "left"
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def hf_logits(path, ids, mask, attn="eager", **config):
    """transformers' own forward (a fresh model, its own attention), positions from the mask as
    transformers' generate computes them for left padding."""
    ref = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, **config).eval()
    return ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits


def lm_loss(model, ids, mask, role):
    logits = model(ids, mask, role=role).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------- logits = transformers'
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_with_no_adapter_equal_transformers_own_forward(paths, family, attn):
    model, tok = load(paths[family])
    ids, mask = left_padded(tok)
    assert ids.shape[1] > 3 * WINDOW and not mask.all()
    want = hf_logits(paths[family], ids, mask, attn)
    with torch.no_grad():
        got = model(ids, mask, role="base").logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    if family == "gemma3_text":
        cfg = model.backbone.config
        assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
        assert cfg.rope_parameters["sliding_attention"]["rope_theta"] != cfg.rope_parameters["full_attention"]["rope_theta"]
        assert cfg.query_pre_attn_scalar != cfg.head_dim and cfg.sliding_window == WINDOW
        # the window is what the comparison above checked: without it the logits past it differ
        wide = hf_logits(paths[family], ids, mask, attn, sliding_window=1024)
        assert (wide[0, WINDOW + 1:] - want[0, WINDOW + 1:]).abs().max() > 1e-3
        torch.testing.assert_close(wide[0, :WINDOW], want[0, :WINDOW], atol=1e-5, rtol=0)


def test_gemma3_final_logit_softcapping_is_applied_as_transformers_does(tmp_path):
    path = make_tiny(tmp_path / "g", "gemma3_text", kv_heads=2, final_logit_softcapping=0.3)
    model, tok = load(path)
    ids, mask = left_padded(tok)
    want = hf_logits(path, ids, mask)
    with torch.no_grad():
        got = model(ids, mask, role="base").logits
        raw = model.backbone.get_output_embeddings()(model(ids, mask, role="base").hidden)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    assert got.abs().max() < 0.3 < raw.abs().max()  # the cap acted


def test_align_attention_gets_and_applies_gemma3s_keywords(paths):
    """What Gemma-3's attention passes (its ``query_pre_attn_scalar`` scale, the window on local
    layers only) reaches align's function, and a ``softcap`` is applied by the eager core exactly
    as Gemma's eager function does, refused by sdpa."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from align import attention
    model, tok = load(paths["gemma3_text"])
    seen = []
    real_fn = attention.core_function

    def spy(cls, impl):
        fn = real_fn(cls, impl)

        def call(module, q, k, v, mask, **kw):
            seen.append((module.layer_idx, kw.get("scaling"), kw.get("softcap"), q.shape[2], mask))
            return fn(module, q, k, v, mask, **kw)
        return call
    ids, mask = left_padded(tok)
    attention.core_function = spy
    try:
        with torch.no_grad():
            model(ids, mask, role="base")
    finally:
        attention.core_function = real_fn
    cfg = model.backbone.config
    assert [s[0] for s in seen] == [0, 1]
    for layer, scaling, softcap, t, m in seen:
        assert scaling == cfg.query_pre_attn_scalar ** -0.5 and softcap is None
        band = (torch.arange(t)[:, None] - torch.arange(t)[None, :]) < WINDOW
        sees_past_window = bool(((~band) & m[0, 0]).any())  # the long row, no padding
        assert sees_past_window == (cfg.layer_types[layer] == "full_attention"), layer
    # softcap: the eager core applies it exactly; sdpa refuses it
    attn = model.backbone.get_submodule(model.arch.attn_path(0))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 6, model.arch.head_dim, generator=g) * 3 for n in (4, 2, 2))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    model.attn_implementation = "eager"
    got = {}
    for cap in (None, 2.0):
        got[cap], _ = attention.align_attention(attn, q, k, v, causal, scaling=attn.scaling, softcap=cap)
        want, _ = eager_attention_forward(attn, q, k, v, additive, scaling=attn.scaling, softcap=cap)
        torch.testing.assert_close(got[cap], want, atol=1e-6, rtol=0)
    assert (got[2.0] - got[None]).abs().max() > 1e-3  # the cap acted
    model.attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="softcap"):
        attention.align_attention(attn, q, k, v, causal, scaling=attn.scaling, softcap=2.0)


@pytest.mark.parametrize("setting,value,match", [("attn_logit_softcapping", 50.0, "does not apply it"),
                                                 ("use_bidirectional_attention", True, "not a causal LM")])
def test_gemma3_settings_that_would_be_ignored_are_refused(setting, value, match):
    cfg = tiny_config("gemma3_text", 64, hidden=32, layers=2, heads=2, **{setting: value})
    with pytest.raises(UnsupportedArchitecture, match=f"{setting}.*{match}"):
        AlignModel(build_tiny_model(cfg))


# ------------------------------------------------------------------------- multimodal Gemma-3
def test_a_multimodal_gemma3_checkpoint_loads_its_language_model_alone(tmp_path):
    from safetensors.torch import load_file, save_file
    path = make_tiny(tmp_path / "mm", "gemma3", kv_heads=2)
    tok = load_tokenizer(path)
    backbone = load_backbone(path, tokenizer=tok)
    assert type(backbone).__name__ == "Gemma3ForCausalLM" and backbone.config.model_type == "gemma3_text"
    assert not any("vision" in n for n, _ in backbone.named_parameters())
    model = AlignModel(backbone)
    assert model.fingerprint == checkpoint_fingerprint(path)
    ids, mask = left_padded(tok)
    mm = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(mm).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        want = mm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        got = model(ids, mask, role="base").logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    # the multimodal class itself is refused, naming what to use
    with pytest.raises(UnsupportedArchitecture, match="load_backbone"):
        AlignModel(mm)
    # a checkpoint whose text weights are not all there is refused, not filled with random ones
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(path / "model.safetensors")
    norm = next(k for k in sd if k.endswith(("language_model.model.norm.weight", "language_model.norm.weight")))
    del sd[norm]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedArchitecture, match="did not load whole"):
        load_backbone(broken, tokenizer=tok)


# ------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_attaches_and_trains(paths, family, method):
    assert set(METHODS) == set(REGISTERED)
    model, tok = load(paths[family])
    tok.padding_side = "right"
    enc = tok(list(TEXTS), padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    h0 = backbone_hash(model)
    torch.manual_seed(0)
    model.add_adapter("a", METHODS[method])
    model.add_role("a", ["a"])
    with torch.no_grad():
        base = model(ids, mask, role="base").logits
        fresh = model(ids, mask, role="a").logits
        before = lm_loss(model, ids, mask, "a").item()
    assert torch.equal(fresh, base) == (method in IDENTITY_AT_INIT)
    # (measured: the loss falls by 0.08 (prompt tuning) to 5 (top_k) nats in these 10 steps)
    opt = torch.optim.Adam(model.set_trainable(["a"]), lr=1e-2 if method in ("full", "top_k") else 5e-2)
    model.train()
    for _ in range(10):
        loss = lm_loss(model, ids, mask, "a")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = lm_loss(model, ids, mask, "a").item()
        assert torch.equal(model(ids, mask, role="base").logits, base)
    assert after < before - 0.05, (before, after)
    assert backbone_hash(model) == h0


GEN_METHODS = ["base", "lora", "prefix", "prompt", "llama_adapter"]  # each way an adapter meets the cache


@pytest.mark.parametrize("method", GEN_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_a_full_forward_per_step(paths, family, method):
    model, tok = load(paths[family])
    role = "base"
    if method != "base":
        aset = model.add_adapter("a", METHODS[method])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in aset.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.add_role("a", ["a"])
        role = "a"
    ids, mask = left_padded(tok, ("the quick brown fox jumps over", "bad rain"))
    # prompt + response run well past Gemma-3's window, so the cache crosses it
    assert ids.shape[1] + 10 > 3 * WINDOW
    assert_cached_generation_equals_uncached(model, tok, ids, mask, role, max_new_tokens=10)


# ------------------------------------------------------------------------- peft
@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_lora_gives_peft_logits_both_ways(paths, tmp_path, family):
    peft = pytest.importorskip("peft")
    from tests.test_peft_interop import (
        check_export_loads_in_peft,
        check_peft_adapter_imports,
    )
    every = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    check_export_loads_in_peft(paths[family], tmp_path / "export", AdapterConfig(method="lora", r=4, alpha=8,
                                                                                 target_modules=every))
    aset = check_peft_adapter_imports(paths[family], tmp_path / "import",
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules=every, task_type="CAUSAL_LM"))
    assert aset.method == "lora" and len(aset.paths) == 7 * model_layers(paths[family])


def model_layers(path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(path)).num_hidden_layers


# ------------------------------------------------------------------------- fingerprint
@pytest.mark.parametrize("family", FAMILIES)
def test_the_backbone_fingerprint_is_stable(paths, family):
    path = paths[family]
    model, tok = load(path)
    fp = model.fingerprint
    assert fp == checkpoint_fingerprint(path) and fp.startswith("sha256:")
    assert AlignModel(load_backbone(path, dtype="bfloat16", tokenizer=tok)).fingerprint == fp
    # the content hash of the loaded weights does not move with adapters, training or sampling
    content = content_fingerprint(model.backbone)
    model.add_adapter("a", METHODS["lora"])
    model.add_adapter("p", METHODS["prefix"])
    model.add_role("a", ["a", "p"])
    opt = torch.optim.Adam(model.set_trainable(["a", "p"]), lr=1e-2)
    ids, mask = left_padded(tok)
    lm_loss(model, ids, mask, "a").backward()
    opt.step()
    sample(model, ids, mask, role="a", max_new_tokens=3, greedy=True)
    assert content_fingerprint(model.backbone) == content
    assert fingerprint(model.backbone) == fp
    # a model built in memory: the same seed gives the same fingerprint, another seed another one
    cfg = AutoModelForCausalLM.from_pretrained(str(path)).config
    built = [fingerprint(build_tiny_model(cfg, seed=s)) for s in (0, 0, 1)]
    assert built[0] == built[1] != built[2]


def content_fingerprint(backbone) -> str:
    """``fingerprint``'s hash of the weights in memory (not the checkpoint's, which it caches)."""
    cached = backbone.__dict__.pop("_align_fingerprint")
    try:
        return fingerprint(backbone)
    finally:
        backbone._align_fingerprint = cached


# ------------------------------------------------------------------------- PPO roles, one storage
@pytest.mark.parametrize("family", FAMILIES)
def test_all_ppo_roles_share_the_one_backbone_in_memory(paths, tmp_path, family):
    import tests.ppo_helpers as H
    from align.stages import ppo
    from tests.test_ppo import ppo_cfg
    path = paths[family]
    sft = H.fake_sft_run(path, tmp_path / "sft")
    rm = H.fake_reward_run(path, tmp_path / "rm")
    cfg = ppo_cfg(tmp_path, sft, tmp_path / "none.jsonl", f"reward_run={rm}", "value.init=reward")
    gc.collect()
    model, tok = load(path)
    ptrs = [p.data_ptr() for p in model.backbone.parameters()]
    ppo.build_roles(model, cfg)
    assert set(model.roles) >= {"reference", "policy", "value", "reward"}
    ids, mask = left_padded(tok)
    with torch.no_grad():
        outs = model(ids, mask, roles=("reference", "policy", "value", "reward"), logits=True)
    assert [p.data_ptr() for p in model.backbone.parameters()] == ptrs
    assert len(set(ptrs)) == len(ptrs)
    emb = model.backbone.get_input_embeddings().weight
    if family == "gemma3_text":  # tied: the LM head is the embedding, one tensor
        assert model.backbone.get_output_embeddings().weight is emb
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    copies = [t for t in tensors if t.shape == emb.shape and t.dtype == emb.dtype and torch.equal(t, emb)]
    assert len({t.untyped_storage().data_ptr() for t in copies}) == 1
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert adapter_numel < 0.25 * sum(p.numel() for p in model.backbone.parameters())
    for role in ("reference", "policy", "value", "reward"):
        assert model.roles[role].adapters
    assert outs["value"].values is not None and outs["reward"].values is not None
    assert not torch.equal(outs["reward"].logits, outs["reference"].logits)  # the reward LoRA acts
