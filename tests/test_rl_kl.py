"""align.rl.kl: KL estimators (k1/k2/k3) and the fixed/adaptive KL controllers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from align.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, make_kl_controller


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_estimators_zero_when_equal(est):
    lp = torch.randn(4, 7)
    assert (kl_per_token(lp, lp.clone(), est) == 0).all()


def test_estimator_formulas_and_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(50, 20, generator=g) * 3, torch.randn(50, 20, generator=g) * 3
    logr = lp - ref
    assert torch.equal(kl_per_token(lp, ref, "k1"), logr)
    assert torch.allclose(kl_per_token(lp, ref, "k2"), 0.5 * logr ** 2)
    k3 = kl_per_token(lp, ref, "k3")
    assert torch.allclose(k3, torch.exp(ref - lp) - 1 - (ref - lp), rtol=1e-5, atol=1e-5)  # TRL's form
    assert (k3 >= 0).all()
    assert (kl_per_token(torch.tensor([1e-9, -1e-9]).double(), torch.zeros(2).double(), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k4")


def test_k1_and_k3_unbiased_on_categorical():
    """Mean over samples a ~ p of k1 (and k3) approaches the exact KL(p || q)."""
    g = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[a], q.log()[a]
    for est in ("k1", "k3"):
        k = kl_per_token(lp, ref, est)
        tol = 4 * float(k.std()) / math.sqrt(len(k))
        assert abs(float(k.mean()) - exact) < tol, (est, float(k.mean()), exact, tol)
    # k1 samples can be negative even though the KL is positive; k2 is not unbiased here
    assert (kl_per_token(lp, ref, "k1") < 0).any()


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.value == 0.05 and isinstance(c.value, float)
    assert c.state_dict() == {"value": 0.05}


def test_adaptive_controller_hand_checked_and_clipped():
    # Ziegler 2019 defaults: init 0.15, target 6, horizon 10000; n_steps = batch size 512
    c = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    c.update(6.6, 512)                      # err = 6.6/6 - 1 = 0.1 (inside the clip)
    assert c.value == pytest.approx(0.15 * (1 + 0.1 * 512 / 10000))
    assert c.value == pytest.approx(0.150768)
    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(60.0, 512)                     # err = 9 -> clipped to +0.2
    assert c.value == pytest.approx(0.15 * 1.01024)
    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(0.0, 512)                      # err = -1 -> clipped to -0.2
    assert c.value == pytest.approx(0.15 * 0.98976)
    c.update(torch.tensor(6.0), 512)        # on target: unchanged; a tensor KL leaves a python float
    assert c.value == pytest.approx(0.15 * 0.98976) and isinstance(c.value, float)


def test_adaptive_state_dict_round_trip_is_exact():
    a = make_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    kls = [1.0, 9.0, 5.5, 6.3, 30.0, 0.1]
    for kl in kls[:3]:
        a.update(kl, 64)
    state = json.loads(json.dumps(a.state_dict()))   # plain floats survive JSON
    b = make_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    b.load_state_dict(state)
    assert b.value == a.value
    for kl in kls[3:]:
        a.update(kl, 64)
        b.update(kl, 64)
    assert b.value == a.value                         # bit-exact continuation


def test_make_kl_controller():
    assert type(make_kl_controller("fixed", 0.05)) is FixedKLController
    assert type(make_kl_controller("adaptive", 0.15)) is AdaptiveKLController
    with pytest.raises(ValueError):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
