"""IA3, prompt tuning, P-tuning, LLaMA-Adapter and the full / top-k baselines behind the adapter
protocol: closed-form sizes, identity at init, cached generation, peft round trips both ways,
isolation of training, align-format save/load and stacking on one backbone."""
from __future__ import annotations

import pytest
import torch

from align.adapters import AdapterConfig
from align.adapters.peft_format import load_adapter, save_adapter
from tests.conftest import load
from tests.test_adapters import (assert_cached_generation_equals_uncached, assert_training_changes_only_set_a, batch,
                                 randomize)

FAMILIES = ["llama", "gpt2", "qwen2"]
METHODS = {
    "ia3": AdapterConfig(method="ia3"),
    "prompt": AdapterConfig(method="prompt", num_virtual_tokens=3),
    "ptuning_mlp": AdapterConfig(method="ptuning", num_virtual_tokens=3, encoder_hidden_size=16),
    "ptuning_lstm": AdapterConfig(method="ptuning", num_virtual_tokens=3, encoder_type="lstm", encoder_hidden_size=8),
    "llama_adapter": AdapterConfig(method="llama_adapter", num_virtual_tokens=3, adapter_layers=1),
    "full": AdapterConfig(method="full"),
    "top_k": AdapterConfig(method="top_k", top_k=1),
}
IDENTITY_AT_INIT = ["ia3", "llama_adapter", "full", "top_k"]


def perturb(aset, seed=0, scale=0.1):
    """Move every tensor a little away from its init (keeps IA3 scales near one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def leaves_params(model, prefix):
    return sum(p.numel() for n, p in model.backbone.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameter_count_matches_closed_form(tiny_paths, family, method):
    model, _ = load(tiny_paths[family])
    aset = model.add_adapter("a", METHODS[method])
    n = aset.num_params()
    assert n == aset.expected_num_params() > 0
    a, c = model.arch, METHODS[method]
    d, kv = a.hidden_size, a.num_kv_heads * a.head_dim
    if method == "ia3":  # l_k, l_v (k/v thirds of gpt2's c_attn) and l_ff per layer
        assert n == a.num_layers * (2 * kv + a.intermediate_size)
    elif method == "prompt":
        assert n == 3 * d
    elif method == "ptuning_mlp":
        h = 16
        assert n == 3 * d + (d * h + h) + (h * h + h) + (h * d + d)
    elif method == "ptuning_lstm":
        h = 8
        lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
        assert n == 3 * d + lstm + (4 * h * h + 2 * h) + (2 * h * d + d)
    elif method == "llama_adapter":
        assert n == c.adapter_layers * (3 * d + 1)
    elif method == "full":
        assert n == model.backbone_num_params()
    elif method == "top_k":
        head = model.backbone.get_output_embeddings().weight.numel()
        norm = sum(p.numel() for n_, p in model.backbone.named_parameters()
                   if n_ in ("model.norm.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"))
        assert n == leaves_params(model, a.block_path(a.num_layers - 1) + ".") + norm + head
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_fresh_set_is_exactly_the_backbone(tiny_paths, family, method):
    model, tok = load(tiny_paths[family])
    ids, mask = batch(tok)
    base = model(ids, mask, role="base").logits
    aset = model.add_adapter("a", METHODS[method])
    if method == "llama_adapter":  # any prompt: the zero gate alone makes it the identity
        randomize(aset.prompts)
    model.add_role("a", ["a"])
    assert torch.equal(model(ids, mask, role="a").logits, base)
    perturb(aset)
    assert not torch.allclose(model(ids, mask, role="a").logits, base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_generation_equals_uncached_greedy(tiny_paths, family, method):
    model, tok = load(tiny_paths[family])
    perturb(model.add_adapter("a", METHODS[method]))
    model.add_role("a", ["a"])
    ids, mask = batch(tok, side="left")
    assert_cached_generation_equals_uncached(model, tok, ids, mask, "a", max_new_tokens=6)


# ------------------------------------------------------------------------- HF peft round trips
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="HF peft is not installed")


def ids_for(tok):
    return tok(["the happy dog sings a good song"], return_tensors="pt").input_ids


def peft_logits(pm, ids):
    """peft's prompt methods also return logits for the N virtual positions: keep the real ones."""
    return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]


PEFT_CASES = {
    "ia3": (["llama", "gpt2", "qwen2"], lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "prompt": (["llama", "gpt2", "qwen2"],
               lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "ptuning_mlp": (["llama", "gpt2"], lambda: peft.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM")),
    "ptuning_lstm": (["llama"], lambda: peft.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM",
        task_type="CAUSAL_LM")),
    # qwen2: not in peft's list of model types, but peft's llama code runs on it unchanged
    "llama_adapter": (["llama", "gpt2", "qwen2"], lambda: peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")),
}
PEFT_PARAMS = [(m, f) for m, (fams, _) in PEFT_CASES.items() for f in fams]


@pytest.fixture
def peft_qwen2_adaption_prompt(monkeypatch):
    """Let peft's adaption prompt run on qwen2 (its llama code, unchanged) as the reference."""
    from peft.tuners.adaption_prompt import config as ap
    monkeypatch.setitem(ap.TRANSFORMERS_MODEL_CONFIG, "qwen2", ap.TRANSFORMERS_MODEL_CONFIG["llama"])


@needs_peft
@pytest.mark.parametrize("method,family", PEFT_PARAMS)
def test_export_loads_in_peft_with_identical_logits(tiny_paths, tmp_path, method, family,
                                                    peft_qwen2_adaption_prompt):
    from tests.test_peft_interop import check_export_loads_in_peft
    check_export_loads_in_peft(tiny_paths[family], tmp_path, METHODS[method])


@needs_peft
@pytest.mark.parametrize("method,family", PEFT_PARAMS)
def test_peft_trained_adapter_imports_with_identical_logits(tiny_paths, tmp_path, method, family,
                                                            peft_qwen2_adaption_prompt):
    from tests.test_peft_interop import check_peft_adapter_imports
    aset = check_peft_adapter_imports(tiny_paths[family], tmp_path, PEFT_CASES[method][1]())
    assert aset.method == METHODS[method].method


# ------------------------------------------------------------------------- isolation, save/load
@pytest.mark.parametrize("method", list(METHODS))
def test_training_changes_only_that_set(tiny_llama, method):
    model, tok = load(tiny_llama)
    ids, mask = batch(tok)
    model.add_adapter("a", METHODS[method])
    perturb(model.add_adapter("b", METHODS[method]), seed=1)
    model.add_role("a", ["a"])
    model.add_role("b", ["b"])
    assert_training_changes_only_set_a(model, ids, mask)


@pytest.mark.parametrize("method", list(METHODS))
def test_align_format_round_trip_and_copy(tiny_llama, tmp_path, method):
    """Saved sets reload with the same logits (P-tuning folded into its prompts, baselines as
    their copied weights), and a copy stacked as a policy starts equal."""
    model, tok = load(tiny_llama)
    ids, mask = batch(tok)
    perturb(model.add_adapter("sft", METHODS[method]))
    model.add_role("sft", ["sft"])
    want = model(ids, mask, role="sft").logits
    save_adapter(model, "sft", tmp_path / "sft")
    fresh, _ = load(tiny_llama)
    aset = load_adapter(fresh, "sft", tmp_path / "sft")
    if method.startswith("ptuning"):
        assert aset.config.encoder_type == "none" and aset.num_params() == 3 * fresh.arch.hidden_size
    fresh.add_role("sft", ["sft"])
    torch.testing.assert_close(fresh(ids, mask, role="sft").logits, want, atol=1e-6, rtol=0)
    fresh.copy_adapter("sft", "policy")
    fresh.add_role("policy", ["policy"])
    torch.testing.assert_close(fresh(ids, mask, role="policy").logits, want, atol=1e-6, rtol=0)


def test_prompt_init_from_text_and_from_vocabulary(tiny_llama):
    model, tok = load(tiny_llama)
    embed = model.backbone.get_input_embeddings().weight
    text_ids = tok("happy dog")["input_ids"]
    assert 1 < len(text_ids) < 5
    aset = model.add_adapter("t", AdapterConfig(method="prompt", num_virtual_tokens=5, prompt_init="text",
                                                prompt_init_text="happy dog"))
    want = (text_ids * 5)[:5]  # repeated, then truncated to N, as peft does
    assert torch.equal(aset.prompts(), embed[want])
    short = model.add_adapter("s", AdapterConfig(method="prompt", num_virtual_tokens=1, prompt_init="text",
                                                 prompt_init_text="happy dog"))
    assert torch.equal(short.prompts(), embed[text_ids[:1]])
    torch.manual_seed(0)
    vocab = model.add_adapter("v", AdapterConfig(method="prompt", num_virtual_tokens=4, prompt_init="sample_vocab"))
    for row in vocab.prompts():
        assert (embed == row).all(-1).any()
    with pytest.raises(ValueError, match="prompt_init"):
        model.add_adapter("x", AdapterConfig(method="prompt", prompt_init="nonsense"))


def test_methods_stack_in_one_role_on_one_backbone(tiny_llama):
    """One backbone, a set of every kind; a role stacking several behaves like the sets applied
    in order, each single-set role is unaffected by the others, and the stack generates the same
    with and without the cache (two virtual-token sets prepend N1 + N2 positions at prefill)."""
    model, tok = load(tiny_llama)
    ids, mask = batch(tok, side="left")
    alone = {}
    for name in ("top_k", "ia3", "prompt", "ptuning_mlp", "llama_adapter"):
        solo, _ = load(tiny_llama)
        perturb(solo.add_adapter(name, METHODS[name]), seed=len(name))
        solo.add_role(name, [name])
        alone[name] = solo(ids, mask, role=name).logits
        model.add_adapter(name, METHODS[name]).copy_from(solo.adapters[name])
        model.add_role(name, [name])
    for name, want in alone.items():
        assert torch.equal(model(ids, mask, role=name).logits, want)
    stack = ["top_k", "ia3", "prompt", "ptuning_mlp", "llama_adapter"]
    model.add_role("stack", stack)
    out = model(ids, mask, role="stack")
    assert out.logits.shape[:2] == ids.shape and out.mask.shape[1] == ids.shape[1] + 6
    assert_cached_generation_equals_uncached(model, tok, ids, mask, "stack", max_new_tokens=6)
