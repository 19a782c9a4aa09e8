"""``model.attn_implementation``: align's attention function adds prefix key/values and
LLaMA-Adapter's output around transformers' own attention of that name (sdpa, the model's eager
function, flex attention); the names that cannot take align's 4-D mask are refused."""
from __future__ import annotations

import pytest
import torch

from align import attention
from align.adapters import AdapterConfig
from align.backbone import load_backbone, load_tokenizer
from align.generation import sample
from align.model import AlignModel
from align.tokens import specials

FAMILIES = ["llama", "gpt2", "qwen2", "qwen3", "gemma3_text"]
ROLES = {"prefix": AdapterConfig(method="prefix", num_virtual_tokens=3),
         "llama_adapter": AdapterConfig(method="llama_adapter", num_virtual_tokens=3, adapter_layers=2)}
TEXTS = ("the quick brown fox jumps over a lazy dog while happy people sing", "bad rain")


def build(path, implementation):
    """An AlignModel with a base role and one randomised role per method in ROLES (same values for
    every implementation)."""
    tok = load_tokenizer(path)
    model = AlignModel(load_backbone(path, tokenizer=tok), attn_implementation=implementation)
    for i, (name, cfg) in enumerate(ROLES.items()):
        aset = model.add_adapter(name, cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in aset.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.add_role(name, [name])
    tok.padding_side = "left"
    enc = tok(list(TEXTS), padding=True, return_tensors="pt")
    return model, tok, enc.input_ids, enc.attention_mask


def used(fn):
    """(fn's result, the core implementations align's attention called during it)."""
    names = set()
    real = attention.core_function

    def spy(cls, impl):
        names.add(impl)
        return real(cls, impl)
    attention.core_function = spy
    try:
        return fn(), names
    finally:
        attention.core_function = real


def run(model, ids, mask):
    out = {}
    for role in ("base", *ROLES):
        model.zero_grad(set_to_none=True)
        logits = model(ids, mask, role=role).logits
        grads = []
        if role != "base":
            (logits[mask.bool()].logsumexp(-1).mean()).backward()
            grads = [p.grad.clone() for p in model.adapters[role].parameters()]
        out[role] = (logits.detach(), grads)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_gives_sdpas_logits_gradients_and_samples(tiny_paths, family):
    results, samples = {}, {}
    for impl in ("sdpa", "eager"):
        model, tok, ids, mask = build(tiny_paths[family], impl)
        model.set_trainable(list(ROLES))
        results[impl], names = used(lambda m=model, i=ids, k=mask: run(m, i, k))
        assert names == {impl}
        kw = {"max_new_tokens": 8, "greedy": True, "stop_token_id": specials(tok).stop_ids,
              "pad_token_id": tok.pad_token_id}
        with torch.no_grad():
            samples[impl] = {r: sample(model, ids, mask, role=r, **kw) for r in ("base", "prefix")}
    real = mask.bool()
    for role in ("base", *ROLES):
        (a, ga), (b, gb) = results["sdpa"][role], results["eager"][role]
        torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=0)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)
        if role != "base":
            assert (a[real] - results["sdpa"]["base"][0][real]).abs().max() > 1e-3  # the adapter acts
    for role in ("base", "prefix"):
        assert torch.equal(samples["eager"][role].tokens, samples["sdpa"][role].tokens)
        torch.testing.assert_close(samples["eager"][role].logprobs, samples["sdpa"][role].logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_flex_attention_gives_sdpas_logits(tiny_paths, family):
    """Compiles flex attention on CPU (about 15 s per model)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    got = {}
    for impl in ("sdpa", "flex_attention"):
        model, _, ids, mask = build(tiny_paths[family], impl)
        with torch.no_grad():
            got[impl], names = used(lambda m=model, i=ids, k=mask: {r: m(i, k, role=r).logits
                                                                        for r in ("base", *ROLES)})
        assert names == {impl}
    real = mask.bool()
    for role in ("base", *ROLES):
        torch.testing.assert_close(got["flex_attention"][role][real], got["sdpa"][role][real], atol=1e-5, rtol=0)


def test_names_that_cannot_take_aligns_mask_are_refused(tiny_llama):
    backbone = load_backbone(tiny_llama)
    for name in ("flash_attention_2", "flash_attention_3"):
        with pytest.raises(ValueError, match=f"attn_implementation='{name}': not supported.*4-D mask"):
            AlignModel(backbone, attn_implementation=name)
    with pytest.raises(ValueError, match="choose one of sdpa, eager, flex_attention"):
        AlignModel(backbone, attn_implementation="bogus")


def test_the_stage_loader_passes_the_setting_on(tiny_llama):
    from align.config import ModelConfig
    from align.stages.common import load_model
    _, model = load_model(str(tiny_llama), ModelConfig(path=str(tiny_llama), attn_implementation="eager"), "cpu")
    assert model.attn_implementation == "eager"
    _, model = load_model(str(tiny_llama), ModelConfig(path=str(tiny_llama)), "cpu")
    assert model.attn_implementation == "sdpa"
