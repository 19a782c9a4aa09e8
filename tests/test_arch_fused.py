"""Families with a fused q|k|v projection beyond gpt2: Phi-3 / Phi-4-mini (``qkv_proj`` stacked
[q; k; v] with grouped-query k/v, ``gate_up_proj``) and GPT-NeoX / Pythia (``query_key_value``
interleaved per head as [H, 3, D], parallel residual, partial rotary). On tiny configs built with
transformers' own config classes: align's forward is transformers', every adapter method attaches
and trains, IA3 and LLaMA-Adapter use exactly the key/value rows (checked against slicing written
out here from the modeling code, not align's), cached decoding equals uncached, peft round trips
give the same logits, merged exports load in transformers, and the PPO roles share one backbone."""
from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch

from align import attention
from align.adapters import AdapterConfig
from align.adapters.base import METHODS as REGISTERED
from align.model import AlignModel
from align.demo.tiny import build_tiny_model, make_tiny, tiny_config
from tests.conftest import load
from tests.test_adapters import (
    assert_cached_generation_equals_uncached,
    backbone_hash,
    batch,
)

FAMILIES = ["phi3", "gpt_neox"]
FUSED_KW = {"phi3": {"kv_heads": 2}, "gpt_neox": {}}   # phi3 with grouped-query k/v (4 heads, 2 kv)
QKV = {"phi3": "qkv_proj", "gpt_neox": "query_key_value"}
ALL_LINEAR = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
              "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}
# every registered method, small
METHODS = {
    "lora": AdapterConfig(method="lora", r=4, alpha=8),
    "bottleneck": AdapterConfig(method="bottleneck", bottleneck_size=8),
    "prefix": AdapterConfig(method="prefix", num_virtual_tokens=3),
    "ia3": AdapterConfig(method="ia3"),
    "prompt": AdapterConfig(method="prompt", num_virtual_tokens=3),
    "ptuning": AdapterConfig(method="ptuning", num_virtual_tokens=3, encoder_hidden_size=16),
    "llama_adapter": AdapterConfig(method="llama_adapter", num_virtual_tokens=3, adapter_layers=1),
    "full": AdapterConfig(method="full"),
    "top_k": AdapterConfig(method="top_k", top_k=1),
}
IDENTITY_AT_INIT = {"lora", "bottleneck", "ia3", "llama_adapter", "full", "top_k"}


def test_every_registered_method_is_covered():
    assert {c.method for c in METHODS.values()} == set(REGISTERED)


@pytest.fixture(scope="module")
def fused_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {f: make_tiny(root / f, f, **FUSED_KW[f]) for f in FAMILIES}


def perturb(aset, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------- the forward is transformers'
def longrope(switch_at: int) -> dict:
    """Phi-4-mini's LongRoPE (short / long factors per rotary frequency), switching at a tiny length."""
    return {"kv_heads": 2, "original_max_position_embeddings": switch_at, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [2.0 + 0.5 * i for i in range(6)]}}


VARIANTS = {
    "phi4mini_like": ("phi3", {"kv_heads": 2}),   # GQA, partial rotary 0.75, tied head
    "phi3mini_like": ("phi3", {"partial_rotary_factor": 1.0, "tie_word_embeddings": False, "sliding_window": 5}),
    "phi_longrope": ("phi3", longrope(8)),        # the batch passes 8 positions: long factors
    "pythia_like": ("gpt_neox", {}),              # parallel residual, rotary on a quarter of each head
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 1.0}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_without_adapters_equal_transformers(variant):
    family, kw = VARIANTS[variant]
    backbone = build_tiny_model(tiny_config(family, 128, **kw), seed=1)
    model = AlignModel(backbone)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 12), generator=g)
    lengths = torch.tensor([12, 7, 4])
    left = (torch.arange(12)[None] >= 12 - lengths[:, None]).long()
    right = (torch.arange(12)[None] < lengths[:, None]).long()
    worst = 0.0
    with torch.no_grad():
        for mask in (left, right):
            ours = model(ids, mask, role="base").logits
            # transformers' own forward: the batch with the positions generate() gives it ...
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            theirs = backbone(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            real = mask.bool()
            worst = max(worst, float((ours[real] - theirs[real]).abs().max()))
            # ... and every row alone, unpadded, with nothing passed but the ids (not under LongRoPE,
            # where transformers picks the factors from a forward's longest row)
            for b in range(3 if variant != "phi_longrope" else 0):
                alone = backbone(input_ids=ids[b][real[b]][None]).logits[0]
                worst = max(worst, float((ours[b][real[b]] - alone).abs().max()))
    print(f"{variant}: max |dlogit| vs transformers = {worst:.3g}")
    assert worst <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fused_layer_without_the_configs_shape_is_refused(family):
    """A checkpoint whose fused rows are not what its config gives would be sliced wrongly."""
    from align.arch import UnsupportedArchitecture
    backbone = build_tiny_model(tiny_config(family, 128, **FUSED_KW[family]))
    attn = backbone.get_submodule("model.layers.1.self_attn" if family == "phi3" else "gpt_neox.layers.1.attention")
    setattr(attn, QKV[family], torch.nn.Linear(64, 3 * 64))   # phi3's GQA has 64 + 2 * 32 rows; neox 3 * 64
    if family == "gpt_neox":
        backbone.get_submodule("gpt_neox.layers.1.mlp").dense_4h_to_h = torch.nn.Linear(128, 64)
    with pytest.raises(UnsupportedArchitecture, match=r"layers\.1\..* maps .* but the config gives"):
        AlignModel(backbone)


# --------------------------------------------------------------------- every method trains
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_attaches_and_a_few_steps_lower_the_loss(fused_paths, family, method):
    torch.manual_seed(0)
    model, tok = load(fused_paths[family])
    ids, mask = batch(tok, texts=("the happy dog sings a good song", "bad rain and sad clouds"))
    base = model(ids, mask, role="base").logits.detach()
    aset = model.add_adapter("a", METHODS[method])
    model.add_role("a", ["a"])
    assert aset.num_params() == aset.expected_num_params() > 0
    if method in IDENTITY_AT_INIT:
        assert torch.equal(model(ids, mask, role="a").logits, base)
    h0 = backbone_hash(model)
    lr = {"full": 1e-3, "llama_adapter": 5e-2}.get(method, 1e-2)   # the zero gate moves alone at first
    opt = torch.optim.AdamW(model.set_trainable(["a"]), lr=lr)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_fn():
        logits = model(ids, mask, role="a").logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    model.train()
    losses = []
    for _ in range(4):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        final = float(loss_fn())
    print(f"{family}/{method}: loss {losses[0]:.4f} -> {final:.4f}")
    assert final < losses[0] - 1e-3
    assert backbone_hash(model) == h0
    assert torch.equal(model(ids, mask, role="base").logits, base)


# --------------------------------------------------------------------- IA3 scales the k and v rows only
def fused_parts(family, arch, out):
    """(q, k, v) [B, T, heads, D] of a fused projection's output, sliced as transformers'
    modeling code slices it (written out here, independently of ``Arch.split_qkv``)."""
    h, kv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    if family == "phi3":   # Phi3Attention: [:H*D], [H*D : H*D + H_kv*D], the rest
        q, k, v = out[..., :h * d], out[..., h * d:h * d + kv * d], out[..., h * d + kv * d:]
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (kv, d)), v.unflatten(-1, (kv, d))
    x = out.unflatten(-1, (h, 3 * d))  # GPTNeoXAttention: view(..., heads, 3 * D).chunk(3, -1)
    return x.chunk(3, dim=-1)


@pytest.fixture
def attention_inputs(monkeypatch):
    """The (query, key, value) each attention call receives, after the model's own slicing and
    rotary embedding, keyed by layer."""
    seen = {}
    inner = attention.sdpa_attention_forward

    def spy(module, query, key, value, *args, **kwargs):
        seen[module.layer_idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return inner(module, query, key, value, *args, **kwargs)
    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_scales_exactly_the_key_and_value_rows(fused_paths, family, attention_inputs):
    model, tok = load(fused_paths[family])
    a = model.arch
    aset = model.add_adapter("ia3", AdapterConfig(method="ia3"))
    model.add_role("ia3", ["ia3"])
    path0 = f"{a.attn_path(0)}.{QKV[family]}"
    down0 = f"{a.mlp_path(0)}.{a.mlp_down}"
    assert aset.kind[path0] == "kv" and aset.kind[down0] == "ff"
    # one value per key head and per value head (constant within a head, so rotary commutes)
    k_scale = 1.5 + 0.25 * torch.arange(a.num_kv_heads, dtype=torch.float32)
    v_scale = 0.5 + 0.125 * torch.arange(a.num_kv_heads, dtype=torch.float32)
    ff = torch.rand(a.intermediate_size, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.no_grad():
        for p in aset.paths:
            if aset.kind[p] == "kv":
                aset.vectors[p.replace(".", "__")].copy_(torch.cat([k_scale.repeat_interleave(a.head_dim),
                                                                    v_scale.repeat_interleave(a.head_dim)]))
            else:
                aset.vectors[p.replace(".", "__")].copy_(ff)
    outs, mlp_in, down_in = {}, {}, {}
    qkv = model.backbone.get_submodule(path0)
    mlp = model.backbone.get_submodule(a.mlp_path(0))
    hooks = [qkv.register_forward_hook(lambda m, i, o: outs.__setitem__(role, o.detach().clone())),
             mlp.register_forward_hook(lambda m, i, o: mlp_in.__setitem__(role, i[0].detach().clone())),
             model.backbone.get_submodule(down0).register_forward_hook(
                 lambda m, i, o: down_in.__setitem__(role, i[0].detach().clone()))]
    ids, mask = batch(tok, side="left")
    seen = {}
    with torch.no_grad():
        for role in ("base", "ia3"):
            model(ids, mask, role=role)
            seen[role] = attention_inputs[0]
    for h in hooks:
        h.remove()
    # the fused layer's output rows, sliced as the modeling code slices them
    q0, k0, v0 = fused_parts(family, a, outs["base"])
    q1, k1, v1 = fused_parts(family, a, outs["ia3"])
    assert torch.equal(q1, q0)
    torch.testing.assert_close(k1, k0 * k_scale[:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(v1, v0 * v_scale[:, None], atol=1e-6, rtol=0)
    # what reaches attention (rotated keys; grouped-query heads not repeated yet)
    (qa, ka, va), (qb, kb, vb) = seen["base"], seen["ia3"]
    assert torch.equal(qb, qa)
    print(f"{family} ia3: max |d| keys {float((kb - ka * k_scale[None, :, None, None]).abs().max()):.3g}, "
          f"values {float((vb - va * v_scale[None, :, None, None]).abs().max()):.3g}")
    torch.testing.assert_close(kb, ka * k_scale[None, :, None, None], atol=1e-5, rtol=0)
    torch.testing.assert_close(vb, va * v_scale[None, :, None, None], atol=1e-6, rtol=0)
    # the MLP's down projection receives l_ff times its intermediate activation
    x = mlp_in["ia3"]
    if family == "phi3":
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        inter = up * mlp.activation_fn(gate)
    else:
        inter = mlp.act(mlp.dense_h_to_4h(x))
    torch.testing.assert_close(down_in["ia3"], inter * ff, atol=1e-6, rtol=0)
    # the peft export is one vector over the layer's rows: ones on the query rows
    full = aset.export_state_dict()[f"base_model.model.{path0}.ia3_l"][:, 0]
    fq, fk, fv = fused_parts(family, a, full)
    assert torch.equal(fq, torch.ones_like(fq))
    assert torch.equal(fk, k_scale[:, None].expand_as(fk)) and torch.equal(fv, v_scale[:, None].expand_as(fv))


# --------------------------------------------------------------------- LLaMA-Adapter by hand
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_adapter_adds_the_gated_prompt_attention_computed_by_hand(fused_paths, family, attention_inputs):
    """peft has no adaption prompt for these families: the reference is the formula, with the
    prompt's keys and values sliced from the fused projection as the modeling code slices it."""
    model, tok = load(fused_paths[family])
    a = model.arch
    aset = model.add_adapter("la", AdapterConfig(method="llama_adapter", num_virtual_tokens=3, adapter_layers=1))
    model.add_role("la", ["la"])
    last = a.num_layers - 1
    with torch.no_grad():
        aset.gates[str(last)].fill_(0.7)
    attn = model.backbone.get_submodule(a.attn_path(last))
    outs = {}
    hook = attn.register_forward_hook(lambda m, i, o: outs.__setitem__(role, o[0].detach().clone()))
    ids, mask = batch(tok, side="left")
    with torch.no_grad():
        for role in ("base", "la"):
            model(ids, mask, role=role)
            if role == "base":
                query = attention_inputs[last][0]          # [B, H, T, D], rotated
        hook.remove()
        _, k, v = fused_parts(family, a, getattr(attn, QKV[family])(aset.prompts[str(last)])[0])  # [K, H_kv, D]
        rep = a.num_heads // a.num_kv_heads
        k = k.repeat_interleave(rep, dim=1).transpose(0, 1)   # [H, K, D]
        v = v.repeat_interleave(rep, dim=1).transpose(0, 1)
        probs = torch.softmax(query @ k.transpose(1, 2) / math.sqrt(a.head_dim), dim=-1)
        added = 0.7 * (probs @ v)                               # [B, H, T, D]
        out_proj = attn.o_proj if family == "phi3" else attn.dense
        want = outs["base"] + added.transpose(1, 2).flatten(2) @ out_proj.weight.T
    assert float((outs["la"] - outs["base"]).abs().max()) > 1e-3
    print(f"{family} llama_adapter vs the formula: max |d| = {float((outs['la'] - want).abs().max()):.3g}")
    torch.testing.assert_close(outs["la"], want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_greedy_decoding_equals_uncached(fused_paths, family, method):
    model, tok = load(fused_paths[family])
    perturb(model.add_adapter("a", METHODS[method]))
    model.add_role("a", ["a"])
    ids, mask = batch(tok, side="left")
    assert_cached_generation_equals_uncached(model, tok, ids, mask, "a", max_new_tokens=6)


@pytest.mark.parametrize("method", ["base", "prefix", "prompt"])
def test_cached_decoding_rebuilds_the_cache_where_longrope_switches_factors(tmp_path, method):
    """Phi-4-mini's LongRoPE rotates every position with other factors once a forward's longest
    row passes original_max_position_embeddings: keys cached under the short factors are stale
    then, and sampling rebuilds the cache at that step (without it the log-probs differ by ~1e-3
    here). The switch falls inside the decoding: prompts of 11 tokens, at 14 (with the 3 prefix
    positions or virtual tokens, earlier)."""
    from align.generation import longrope_switch
    path = make_tiny(tmp_path / "phi", "phi3", **longrope(14))
    model, tok = load(path)
    assert longrope_switch(model.backbone) == 14
    role = "base"
    if method != "base":
        perturb(model.add_adapter("a", METHODS[method]))
        role = model.add_role("a", ["a"]).name
    ids, mask = batch(tok, side="left")
    assert ids.shape[1] == 11
    assert_cached_generation_equals_uncached(model, tok, ids, mask, role, max_new_tokens=8)


# --------------------------------------------------------------------- HF peft both ways
peft = pytest.importorskip("peft")

PEFT_CASES = {  # (align config, peft config); LoRA on the fused layer as peft puts it
    "lora": (lambda f: METHODS["lora"],
             lambda f: peft.LoraConfig(r=4, lora_alpha=8, target_modules=[QKV[f]], task_type="CAUSAL_LM")),
    "lora_peft_default": (lambda f: METHODS["lora"],   # peft's own gpt_neox default: query_key_value
                          lambda f: peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")),
    "lora_all_linear": (lambda f: AdapterConfig(method="lora", r=2, alpha=4, target_modules=ALL_LINEAR[f]),
                        lambda f: peft.LoraConfig(r=2, lora_alpha=4, target_modules=ALL_LINEAR[f],
                                                  task_type="CAUSAL_LM")),
    "ia3": (lambda f: METHODS["ia3"],
            lambda f: peft.IA3Config(target_modules=[QKV[f], "down_proj" if f == "phi3" else "dense_4h_to_h"],
                                     feedforward_modules=["down_proj" if f == "phi3" else "dense_4h_to_h"],
                                     task_type="CAUSAL_LM")),
    "prefix": (lambda f: METHODS["prefix"],
               lambda f: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prompt": (lambda f: METHODS["prompt"],
               lambda f: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "ptuning": (lambda f: METHODS["ptuning"],
                lambda f: peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16,
                                                   task_type="CAUSAL_LM")),
}
PEFT_PARAMS = [(m, f) for m in PEFT_CASES for f in FAMILIES if not (m == "lora_peft_default" and f == "phi3")]


@pytest.mark.parametrize("method,family", PEFT_PARAMS)
def test_peft_round_trips_give_identical_logits(fused_paths, tmp_path, method, family):
    from tests.test_peft_interop import (
        check_export_loads_in_peft,
        check_peft_adapter_imports,
    )
    ours, theirs = PEFT_CASES[method]
    check_export_loads_in_peft(fused_paths[family], tmp_path / "out", ours(family))
    aset = check_peft_adapter_imports(fused_paths[family], tmp_path / "in", theirs(family))
    assert aset.method == ours(family).method


def test_peft_has_no_phi3_lora_default_and_align_uses_the_fused_layer(fused_paths):
    """peft asks for target_modules on phi3; align's default is one LoRA on qkv_proj."""
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(fused_paths["phi3"])
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(base, peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    model, _ = load(fused_paths["phi3"])
    aset = model.add_adapter("a", METHODS["lora"])
    assert aset.paths == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(model.arch.num_layers)]


# --------------------------------------------------------------------- exports
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_hf_export_and_reward_export_match_align(fused_paths, tmp_path, family):
    """The merged causal LM (a LoRA on every linear layer, then IA3 on top) and a reward role as
    <Family>ForSequenceClassification load in transformers with align's logits and scores; GGUF
    export refuses the family before writing anything."""
    from transformers import AutoModelForSequenceClassification

    from align.export import ExportError, export
    from align.scoring import sequence_rewards
    from tests.test_export import TEXTS, align_logits, hf_logits, ids_of, make_run
    path = fused_paths[family]
    sets = {"sft": AdapterConfig(method="lora", r=2, alpha=4, target_modules=ALL_LINEAR[family]),
            "policy": AdapterConfig(method="ia3")}
    run, model, tok = make_run(tmp_path, path, sets)
    out = export(run, tmp_path / "hf")
    ids = ids_of(tok)
    theirs, _ = hf_logits(out, ids)
    diff = float((theirs - align_logits(model, "policy", ids)).abs().max())
    print(f"{family} merged hf export: max |dlogit| = {diff:.3g}")
    assert diff <= 1e-4
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:   # the checkpoint's own names, as Pythia's
        names = set(f.keys())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())
    assert ("embed_out.weight" in names) == (family == "gpt_neox")
    with pytest.raises(ExportError, match=f"architecture is {family} .*Llama family"):
        export(run, tmp_path / "gguf", fmt="gguf")
    assert not (tmp_path / "gguf").exists()

    run, model, tok = make_run(tmp_path / "r", path, {"reward": AdapterConfig(method="lora", r=4, alpha=8)},
                               role="reward", head=True)
    out = export(run, tmp_path / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    enc = tok([t + tok.eos_token for t in TEXTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = rm(**enc).logits[:, 0] + rm.config.align_score_offset
        want = sequence_rewards(model(enc["input_ids"], enc["attention_mask"], role="reward").values,
                                enc["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------- fingerprint, one backbone
@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_is_stable_and_all_ppo_roles_share_one_backbone(fused_paths, tmp_path, family):
    import tests.ppo_helpers as H
    from align.backbone import checkpoint_fingerprint, fingerprint
    from align.stages import ppo
    from tests.test_ppo import ppo_cfg
    path = fused_paths[family]
    # the checkpoint's hash, the same at every load; an in-memory build hashes its weights
    first, _ = load(path)
    assert first.fingerprint == checkpoint_fingerprint(path) == load(path)[0].fingerprint
    cfg = tiny_config(family, 128, **FUSED_KW[family])
    fps = [fingerprint(build_tiny_model(cfg, seed=s)) for s in (0, 0, 1)]
    assert fps[0] == fps[1] != fps[2]
    del first

    sft = H.fake_sft_run(path, tmp_path / "sft")
    rm = H.fake_reward_run(path, tmp_path / "rm")
    cfg = ppo_cfg(tmp_path, sft, tmp_path / "none.jsonl", f"reward_run={rm}", "value.init=reward")
    gc.collect()
    model, tok = load(path)
    ppo.build_roles(model, cfg)
    assert set(model.roles) >= {"reference", "policy", "value", "reward"}
    ids, mask = batch(tok)
    with torch.no_grad():
        outs = model(ids, mask, roles=("reference", "policy", "value", "reward"))
    assert outs["value"].values is not None and outs["reward"].values is not None
    emb = model.backbone.get_input_embeddings().weight
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    copies = [t for t in tensors if t.shape == emb.shape and t.dtype == emb.dtype and torch.equal(t, emb)]
    assert len({t.untyped_storage().data_ptr() for t in copies}) == 1
    ptrs = {p.data_ptr() for p in model.backbone.parameters()}
    assert len(ptrs) == len(list(model.backbone.parameters()))
    for role in ("reference", "policy", "value", "reward"):
        assert model.roles[role].adapters   # each role is adapters over the same module tree
    own = {p.data_ptr() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert own and not own & ptrs
