"""align.rl.functional: masked statistics, whitening, log-probs, entropy, first_true_indices."""
from __future__ import annotations

import math

import pytest
import torch

from align.rl.functional import (entropy_from_logits, first_true_indices, logprobs_from_logits, masked_mean,
                                 masked_var, masked_whiten)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -8.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))
    # mean 3, squared deviations 4, 1, 0, 1, 4 -> biased 2, unbiased 2.5
    assert masked_var(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(2.5)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(x[mask].var(unbiased=True).item())
    # a float 0/1 mask behaves like the bool mask; an empty mask gives 0, not NaN
    assert masked_mean(x, mask.float()).item() == pytest.approx(3.0)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_stats_ignore_nan_and_inf_on_pads():
    x = torch.tensor([[1.0, 3.0, float("nan"), float("inf")]])
    mask = prefix_mask([2], 4)
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == 1.0
    w = masked_whiten(x, mask)
    assert torch.isfinite(w).all() and (w[0, 2:] == 0).all()


def test_masked_whiten_mean_zero_var_one_zeros_elsewhere():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3.0 + 2.0
    mask = prefix_mask([9, 1, 4, 7, 2, 5], 9)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)   # biased var, +1e-8 in rsqrt
    assert (w[~mask] == 0).all()
    # exact formula: (x - mean) * rsqrt(var_biased + 1e-8)
    sel = x[mask]
    expect = (sel - sel.mean()) / torch.sqrt(sel.var(unbiased=False) + 1e-8)
    assert torch.allclose(w[mask], expect)
    # shift_mean=False: std divided out, mean kept
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(sel.mean().item(), abs=1e-10)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w2[~mask] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_from_logits_matches_log_softmax_gather(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expect = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = logprobs_from_logits(logits, tokens, temperature)
    assert got.shape == (3, 5)
    assert torch.allclose(got, expect, atol=1e-6)
    # low-precision logits are upcast to float32; float64 stays float64
    assert logprobs_from_logits(logits.bfloat16(), tokens, temperature).dtype == torch.float32
    assert logprobs_from_logits(logits.double(), tokens, temperature).dtype == torch.float64


def test_logprobs_gradient_flows():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    logprobs_from_logits(logits, tokens, 0.7).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, generator=g)
    for temperature in (1.0, 0.7):
        expect = torch.distributions.Categorical(logits=logits / temperature).entropy()
        assert torch.allclose(entropy_from_logits(logits, temperature), expect, atol=1e-6)
    # uniform over V -> log V; -inf logits contribute 0, not NaN
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(math.log(8))
    masked = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    assert entropy_from_logits(masked).item() == pytest.approx(math.log(2))


def test_first_true_indices():
    b = torch.tensor([[False, True, False, True],
                      [False, False, False, False],
                      [True, False, False, False],
                      [False, False, False, True]])
    assert first_true_indices(b).tolist() == [1, 4, 0, 3]
    assert first_true_indices(b, dtype=torch.int32).dtype == torch.int32
    assert first_true_indices(b.view(2, 2, 4)).tolist() == [[1, 4], [0, 3]]
    assert first_true_indices(torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0, 0, 0]
