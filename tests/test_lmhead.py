"""align.lmhead: log-probs and entropy from hidden states through a frozen head, chunk by chunk,
equal to the logits path in values and gradients, without [N, V] tensors kept for the backward."""
import pytest
import torch

from align import lmhead
from align.backbone import load_backbone, load_tokenizer
from align.model import AlignModel
from align.rl.functional import entropy_from_logits, logprobs_from_logits
from align.scoring import response_stats


@pytest.fixture
def model(tiny_llama):
    return AlignModel(load_backbone(tiny_llama, tokenizer=load_tokenizer(tiny_llama)))


def reference(model, hidden, tokens, temperature):
    logits = model.lm_logits(hidden)
    return logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("masked", [False, True])
def test_values_gradients_and_entropy_equal_the_logits_path(model, monkeypatch, temperature, cap, masked):
    monkeypatch.setattr(lmhead, "CHUNK_BYTES", 4 * model.backbone.config.vocab_size * 5)   # 5 positions per chunk: several chunks
    model.final_logit_softcapping = cap
    if masked:
        model.masked_token_ids = [3, 7]
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, model.backbone.config.hidden_size, requires_grad=True)
    tokens = torch.randint(10, model.backbone.config.vocab_size, (3, 7))
    weights = torch.randn(3, 7)
    lp_ref, ent_ref = reference(model, hidden, tokens, temperature)
    (g_ref,) = torch.autograd.grad((lp_ref * weights).sum(), hidden)
    lp, ent = lmhead.token_logprobs(model, hidden, tokens, temperature, entropy=True)
    (g,) = torch.autograd.grad((lp * weights).sum(), hidden)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert not ent.requires_grad


def test_nothing_of_vocabulary_size_is_kept_for_the_backward(model):
    # a model built in memory: saved-tensor hooks leave graphs that hold the head weight alive, and
    # the loaded one's is a view into the memory-mapped checkpoint (test_quantization checks no
    # mapping is left behind)
    model = AlignModel(model.backbone.__class__(model.backbone.config))
    vocab = model.backbone.config.vocab_size
    saved = []
    hidden = torch.randn(4, 9, model.backbone.config.hidden_size, requires_grad=True)
    tokens = torch.randint(10, vocab, (4, 9))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lp, _ = lmhead.token_logprobs(model, hidden, tokens, 1.0)
    assert saved and all(vocab not in s for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lp_ref, _ = reference(model, hidden, tokens, 1.0)
    assert any(s[-1] == vocab for s in saved)   # the logits path does keep [.., V] tensors


def test_a_head_that_trains_or_is_not_a_plain_linear_takes_the_logits_path(model):
    from align.adapters import AdapterConfig
    assert lmhead.fused_head(model) is not None
    other = AlignModel(model.backbone.__class__(model.backbone.config))
    other.add_adapter("h", AdapterConfig(method="lora", r=2, alpha=4, target_modules=["lm_head"]))
    assert lmhead.fused_head(other) is None   # the LoRA on the head runs as a hook of its forward
    model.backbone.get_output_embeddings().weight.requires_grad_(True)
    assert lmhead.fused_head(model) is None
    with pytest.raises(ValueError, match="fused_head"):
        lmhead.token_logprobs(model, torch.randn(1, 2, model.backbone.config.hidden_size), torch.zeros(1, 2), 1.0)


def test_response_stats_fused_equals_logits_path_for_the_adapters_gradients(model):
    from align.adapters import AdapterConfig
    model.add_adapter("p", AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_role("p", ["p"])
    model.add_head("v")
    model.add_role("v", [], head="v")
    torch.manual_seed(1)
    q, r = torch.randint(5, 300, (3, 11)), torch.randint(5, 300, (3, 6))
    qm, rm = torch.ones_like(q), torch.ones_like(r, dtype=torch.bool)
    qm[0, :4] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:   # LoRA's B starts at 0: give every parameter a gradient path
            p.add_(0.1 * torch.randn_like(p))
    grads = []
    for logits in (False, True):
        st = response_stats(model, q, qm, r, rm, ("p", "v"), 0.8, logits=logits, entropy=True)
        assert ("logits" in st["p"]) == logits and "values" in st["v"]
        (st["p"]["logprobs"].sum() + st["v"]["values"].sum()).backward()
        grads.append([p.grad.clone() for p in params])
        model.zero_grad()
        if not logits:
            fused = st
    torch.testing.assert_close(fused["p"]["logprobs"], st["p"]["logprobs"], rtol=0, atol=2e-6)
    torch.testing.assert_close(fused["p"]["entropy"], st["p"]["entropy"], rtol=0, atol=2e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
