"""DPO stage: the losses against hand computation, policy == reference at step 0, learning a known
preference rule with the reference untouched, exact resume, config refusal, `align config dpo`."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from align.config import ConfigError, load_config
from align.rl.losses import dpo_loss, dpo_pair_loss, plackett_luce_loss
from align.stages import dpo
from tests.test_reward import rule_rankings

LOG2 = math.log(2)


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------ losses by hand
def test_pair_losses_match_hand_computation():
    # policy / reference log-probs of (chosen, rejected): h = (-3 + 4) - (-5 + 4.5) = 1.5
    pol, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    ranks, group = torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long)
    beta = 0.5
    loss, st = dpo_loss(pol, ref, ranks, group, 1, beta, "sigmoid")
    assert loss.item() == pytest.approx(-lsig(0.75), abs=1e-6)
    assert st["rewards/chosen"].item() == pytest.approx(0.5) and st["rewards/rejected"].item() == pytest.approx(-0.25)
    assert st["margin"].item() == pytest.approx(0.75) and st["accuracy"].item() == 1.0
    assert st["logps/chosen"].item() == -3.0 and st["logps/rejected"].item() == -5.0
    smooth, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "sigmoid", label_smoothing=0.2)
    assert smooth.item() == pytest.approx(-(0.8 * lsig(0.75) + 0.2 * lsig(-0.75)), abs=1e-6)
    ipo, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "ipo", ipo_logps="sum")
    assert ipo.item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2, abs=1e-6)
    with pytest.raises(ValueError, match="length"):  # the default (per-token mean) needs the lengths
        dpo_loss(pol, ref, ranks, group, 1, beta, "ipo")
    with pytest.raises(ValueError, match="choose sigmoid or ipo"):
        dpo_pair_loss(torch.tensor([1.0]), 0.1, "hinge")


def test_kwise_is_all_ordered_pairs_averaged_per_group_and_k2_is_the_pair_loss():
    beta = 0.3
    # group 0: K=3, ranks c0 best, c2 middle, c1 worst; group 1: a pair
    pol = torch.tensor([-1.0, -2.0, -1.5, -3.0, -2.0])
    ref = torch.tensor([-1.2, -1.8, -1.5, -2.5, -2.5])
    ranks = torch.tensor([0.0, 2.0, 1.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    d = [p - r for p, r in zip(pol.tolist(), ref.tolist())]
    g0 = [(0, 2), (0, 1), (2, 1)]
    for kind in ("sigmoid", "ipo"):
        def pair(h):
            return -lsig(beta * h) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2
        want = 0.5 * (sum(pair(d[i] - d[j]) for i, j in g0) / 3 + pair(d[3] - d[4]))
        loss, st = dpo_loss(pol, ref, ranks, group, 2, beta, kind, ipo_logps="sum")
        assert loss.item() == pytest.approx(want, abs=1e-6) and st["pairs"] == 4
        # weights: group 0 counts 3 times as much as group 1
        wl, _ = dpo_loss(pol, ref, ranks, group, 2, beta, kind, weight=torch.tensor([3.0, 1.0]), ipo_logps="sum")
        # a weight scales its group's loss; the denominator counts groups
        assert wl.item() == pytest.approx((3 * sum(pair(d[i] - d[j]) for i, j in g0) / 3 + pair(d[3] - d[4])) / 2,
                                          abs=1e-6)
    # K = 2 groups: the mean of the plain pairwise losses
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    rc, rr = torch.tensor([-1.5, -3.5]), torch.tensor([-1.5, -3.0])
    pairwise = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    flat = lambda a, b: torch.stack([a, b], 1).reshape(-1)  # noqa: E731
    loss, _ = dpo_loss(flat(pc, pr), flat(rc, rr), torch.tensor([0.0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), 2, beta)
    assert loss.item() == pytest.approx(pairwise.item(), abs=1e-6)
    # ties are skipped
    tie, st = dpo_loss(torch.tensor([-1.0, -1.0, -2.0]), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]),
                       torch.zeros(3, dtype=torch.long), 1, 1.0)
    assert st["pairs"] == 2 and tie.item() == pytest.approx(-lsig(1.0), abs=1e-6)


def test_ipo_default_divides_each_log_ratio_by_its_length_and_sum_is_eq17():
    # chosen 10 tokens, rejected 50: log-ratios +2.0 and -5.0 summed
    pol, ref = torch.tensor([-12.0, -80.0]), torch.tensor([-14.0, -75.0])
    ranks, group, lengths = torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long), torch.tensor([10, 50])
    beta = 0.1
    mean, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "ipo", lengths=lengths)
    h_mean = 2.0 / 10 - (-5.0) / 50              # 0.2 + 0.1 = 0.3
    assert mean.item() == pytest.approx((h_mean - 1 / (2 * beta)) ** 2, abs=1e-5)   # (0.3 - 5)^2 = 22.09
    summed, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "ipo", lengths=lengths, ipo_logps="sum")
    assert summed.item() == pytest.approx((7.0 - 5.0) ** 2, abs=1e-5)              # h = 2 + 5 = 7
    assert mean.item() == pytest.approx(22.09, abs=1e-4) and summed.item() == pytest.approx(4.0, abs=1e-4)
    # the sigmoid loss ignores the lengths
    s1, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "sigmoid", lengths=lengths)
    assert s1.item() == pytest.approx(-lsig(beta * 7.0), abs=1e-6)


def test_plackett_luce_by_hand_and_k2_equals_sigmoid_dpo():
    beta = 0.7
    pol, ref = torch.tensor([-1.0, -2.5]), torch.tensor([-1.5, -2.0])
    ranks, group = torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long)
    pl = plackett_luce_loss(pol, ref, ranks, group, 1, beta)
    sig, _ = dpo_loss(pol, ref, ranks, group, 1, beta, "sigmoid")
    assert pl.item() == pytest.approx(sig.item(), abs=1e-6)
    assert dpo_loss(pol, ref, ranks, group, 1, beta, "plackett_luce")[0].item() == pytest.approx(sig.item(), abs=1e-6)
    # K = 3, order c1 > c2 > c0: -(r1 - lse(r1, r2, r0)) - (r2 - lse(r2, r0))
    pol3, ref3 = torch.tensor([-2.0, -1.0, -1.2]), torch.tensor([-1.5, -1.5, -1.0])
    r = [beta * (p - q) for p, q in zip(pol3.tolist(), ref3.tolist())]
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    want = -(r[1] - lse(r[1], r[2], r[0])) - (r[2] - lse(r[2], r[0]))
    got = plackett_luce_loss(pol3, ref3, torch.tensor([2.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.long), 1, beta)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # next to a pair, each group one unit
    both = plackett_luce_loss(torch.cat([pol3, pol]), torch.cat([ref3, ref]), torch.tensor([2.0, 0, 1, 0, 1]),
                              torch.tensor([0, 0, 0, 1, 1]), 2, beta)
    assert both.item() == pytest.approx((want + sig.item()) / 2, abs=1e-6)


def test_policy_equal_to_reference_gives_log2_and_zero_margins():
    lp = torch.tensor([-3.0, -5.0, -4.0, -2.0, -2.5])
    ranks, group = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1, 1])
    loss, st = dpo_loss(lp.clone(), lp, ranks, group, 2, 0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert st["margin"].item() == 0 and st["accuracy"].item() == 0.5 and st["rewards/chosen"].item() == 0


# ------------------------------------------------------------------------------ on a tiny model
def _setup(tiny_llama, tmp_path, *overrides):
    from align.adapters import AdapterConfig
    from align.adapters.peft_format import load_adapter, save_adapter
    from align.data.common import read_records
    from align.data.preferences import to_group, tokenize_groups
    from tests.conftest import load
    from tests.ppo_helpers import fake_sft_run
    sft = fake_sft_run(tiny_llama, tmp_path / "sft", AdapterConfig(method="lora", r=4, alpha=8))
    model, tok = load(tiny_llama)
    load_adapter(model, "sft", sft / "adapters" / "sft")
    with torch.no_grad():  # a non-identity SFT set: the reference is not the bare backbone
        for p in model.adapters["sft"].parameters():
            p.normal_(0, 0.05)
    save_adapter(model, "sft", sft / "adapters" / "sft")
    data = rule_rankings(tmp_path / "rules.jsonl", n=12)
    cfg = load_config(dpo.DPOConfig, None, [f"output_dir={tmp_path / 'out'}", f"sft_run={sft}", f"data.train={data}",
                                            "tracking.wandb=false", *overrides])
    model, tok = load(tiny_llama)
    _, frozen = dpo.build_dpo_roles(model, cfg)
    groups, _, _ = tokenize_groups([to_group(r, "x") for r in read_records(data)], tok, 64)
    return cfg, model, tok, groups, frozen


def test_step_zero_loss_is_log2_and_only_the_policy_gets_gradients(tiny_llama, tmp_path):
    cfg, model, tok, groups, frozen = _setup(tiny_llama, tmp_path)
    model.train()
    ref = dpo.group_logprobs(model, groups[:4], tok.pad_token_id, "cpu", 4, "reference")
    batch_pre = dpo.collate_dpo(list(zip(groups[:4], ref)), tok.pad_token_id)
    batch_live = dpo.collate_dpo([(g, None) for g in groups[:4]], tok.pad_token_id)
    assert "ref_logps" not in batch_live
    for batch in (batch_pre, batch_live):
        loss, st = dpo.dpo_loss_fn(model, cfg.dpo, frozen)(model, batch)
        assert loss.item() == pytest.approx(LOG2, abs=1e-6)
        assert abs(st["margin"].item()) < 1e-6 and abs(st["rewards/chosen"].item()) < 1e-6
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in model.adapters["sft"].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters["policy"].parameters())
    # the completion mask covers exactly the completion tokens (stop token included)
    g = groups[0]
    cm = batch_live["completion_mask"][0]
    assert int(cm.sum()) == len(g.sequences[0]) - g.prompt_lengths[0] and not cm[:g.prompt_lengths[0]].any()
    # a moved policy: precomputed and live reference give the same loss
    with torch.no_grad():
        for p in model.adapters["policy"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    a, _ = dpo.dpo_loss_fn(model, cfg.dpo, frozen)(model, batch_pre)
    b, _ = dpo.dpo_loss_fn(model, cfg.dpo, frozen)(model, batch_live)
    assert abs(a.item() - LOG2) > 1e-3 and a.item() == pytest.approx(b.item(), abs=1e-5)


def test_sequence_logprob_is_the_sum_over_completion_tokens(tiny_llama, tmp_path):
    cfg, model, tok, groups, _ = _setup(tiny_llama, tmp_path)
    g = groups[0]
    got = dpo.group_logprobs(model, [g], tok.pad_token_id, "cpu", 1, "policy")[0]
    with torch.no_grad():
        for k, s in enumerate(g.sequences):
            ids = torch.tensor([s])
            logits = model(ids, torch.ones_like(ids), role="policy").logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            assert got[k].item() == pytest.approx(lp[g.prompt_lengths[k] - 1:].sum().item(), abs=1e-4)


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_a_known_rule_and_leaves_the_reference_alone(tiny_llama, tmp_path, monkeypatch):
    """Held-out implicit-reward accuracy on prompts never trained on rises well above chance (0.5)."""
    from tests.ppo_helpers import fake_sft_run
    built = {}

    def spy(model, cfg):  # keep the stage's model to look at its reference adapters afterwards
        built["model"] = model
        return build(model, cfg)
    build = dpo.build_dpo_roles
    monkeypatch.setattr(dpo, "build_dpo_roles", spy)
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    before = load_file(sft / "adapters" / "sft" / "adapter_model.safetensors")
    data = rule_rankings(tmp_path / "rules.jsonl")
    out = dpo.run(load_config(dpo.DPOConfig, None, [
        f"output_dir={tmp_path / 'dpo'}", f"sft_run={sft}", f"data.train={data}", "data.eval_fraction=0.2",
        "dpo.beta=0.5", "train.batch_size=8", "train.epochs=1", "train.lr=1e-2", "train.eval_every=10",
        "train.log_every=5", "eval.kl_prompts=8", "eval.max_new_tokens=6", "tracking.wandb=false"]))
    evals = [m for m in _metrics(tmp_path / "dpo") if "eval/accuracy" in m]
    assert evals[0]["step"] == 0 and evals[0]["eval/accuracy"] == 0.5 and evals[0]["eval/margin"] == 0
    assert evals[0]["eval/loss"] == pytest.approx(LOG2, abs=1e-6)
    assert evals[0]["eval/kl"] == 0 == evals[0]["eval/kl_sampled"]
    assert out["eval/accuracy"] >= 0.8, evals
    assert out["eval/margin"] > 0 and out["eval/pairs"] >= 100 and out["eval/kl"] > 0
    train_logs = [m for m in _metrics(tmp_path / "dpo") if "loss" in m]
    logged = {"accuracy", "margin", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    assert logged <= set(train_logs[-1])
    after = {k: v.detach().cpu() for k, v in built["model"].adapters["sft"].export_state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    run = tmp_path / "dpo"
    assert (run / "adapters" / "policy" / "adapter_model.safetensors").exists()
    role = json.loads((run / "roles.json").read_text())["policy"]
    assert role["adapters"] == [{"name": "policy", "dir": "adapters/policy"}]
    pol = load_file(run / "adapters" / "policy" / "adapter_model.safetensors")
    assert pol.keys() == before.keys() and any(not torch.equal(pol[k], before[k]) for k in pol)
    # align eval takes the DPO run dir as a policy
    from align import evaluate
    from tests.ppo_helpers import fake_reward_run, write_prompts
    rm = fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"review {i}:" for i in range(4)])
    cmp = evaluate.compare(load_config(evaluate.EvalConfig, None, [
        f"sft_run={sft}", f"reward_run={rm}", f"policy_b={run}", f"prompts={prompts}", "response_length=4"]))
    assert cmp["a"]["kl_to_sft_mean"] == 0 and cmp["n_prompts"] == 4 and math.isfinite(cmp["b"]["kl_to_sft_mean"])
    print(f"DPO held-out accuracy: {evals[0]['eval/accuracy']:.3f} -> {out['eval/accuracy']:.3f} "
          f"(margin {out['eval/margin']:.3f}, KL {out['eval/kl']:.3f}); evals: "
          f"{[(e['step'], round(e['eval/accuracy'], 3)) for e in evals]}")


@pytest.mark.parametrize("variant", [
    # a new set with dropout on the frozen SFT adapters, the live reference, the listwise loss
    ["init=sft_stack", "adapter.r=2", "adapter.dropout=0.1", "dpo.reference=batch", "dpo.loss=plackett_luce"],
    # the default copy, precomputed reference log-probs (recomputed on resume), IPO
    ["dpo.loss=ipo"],
], ids=["stack-batch-pl", "copy-precompute-ipo"])
def test_kill_and_resume_gives_bitwise_identical_adapters(tiny_llama, tmp_path, variant):
    from tests.ppo_helpers import fake_sft_run
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    data = rule_rankings(tmp_path / "rules.jsonl", n=60)

    def cfg(name, *extra):
        return load_config(dpo.DPOConfig, None, [
            f"output_dir={tmp_path / name}", f"sft_run={sft}", f"data.train={data}", "data.eval_fraction=0.2",
            *variant, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=8", "train.save_every=4",
            "train.eval_every=4", "train.log_every=1", "eval.kl_prompts=2", "eval.max_new_tokens=3",
            "tracking.wandb=false", *extra])
    dpo.run(cfg("full"))
    assert dpo.run(cfg("killed", "train.stop_after_steps=5")) == {"stopped_at": 5}
    dpo.run(cfg("killed", "resume=true"))
    a = load_file(tmp_path / "full" / "adapters" / "policy" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapters" / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(_metrics(tmp_path / "full")) == strip(_metrics(tmp_path / "killed"))
    stack = json.loads((tmp_path / "full" / "roles.json").read_text())["policy"]["adapters"]
    if "init=sft_stack" not in variant:
        assert [e["name"] for e in stack] == ["policy"]
        return
    assert [e["name"] for e in stack] == ["sft", "policy"]
    # align eval rebuilds the stack: the SFT set under the run's own
    from align.adapters.peft_format import load_adapter
    from align.evaluate import _load_policy
    from tests.conftest import load
    model, _ = load(tiny_llama)
    load_adapter(model, "sft", sft / "adapters" / "sft")
    assert _load_policy(model, str(tmp_path / "full"), str(sft), "b") == ["sft", "policy_b"]


# ------------------------------------------------------------------------------ config
@pytest.fixture
def world(tmp_path, monkeypatch):
    import align.stages.common

    def trip(*a, **k):
        raise RuntimeError("tripwire: validation passed; a model would be loaded now")
    monkeypatch.setattr(align.stages.common, "load_model", trip)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    sft = tmp_path / "sft_run"
    (sft / "adapters" / "sft").mkdir(parents=True)
    (sft / "backbone.json").write_text(json.dumps({"path": str(backbone)}))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    out = tmp_path / "out"
    return out, [f"output_dir={out}", f"sft_run={sft}", f"data.train={prefs}", "data.eval_fraction=0",
                 "tracking.wandb=false"]


@pytest.mark.parametrize("override,message", [
    ("dpo.beta=0", r"dpo.beta=0.0: must be > 0"),
    ("dpo.beta=-1", r"dpo.beta=-1.0: must be > 0"),
    ("dpo.loss=hinge", r"dpo.loss='hinge': choose one of sigmoid, ipo, plackett_luce"),
    ("dpo.reference=none", r"dpo.reference='none': choose one of precompute, batch"),
    ("dpo.label_smoothing=0.5", r"dpo.label_smoothing=0.5: must be in \[0, 0.5\)"),
    ("init=base", r"init='base': choose one of sft_copy, sft_stack"),
    ("data.train=/nonexistent.jsonl", r"data.train='/nonexistent.jsonl'"),
    ("eval.kl_prompts=-1", r"eval.kl_prompts=-1: must be >= 0"),
])
def test_bad_config_is_refused_before_anything_is_written(world, override, message):
    out, base = world
    with pytest.raises(ConfigError, match=message):
        dpo.run(load_config(dpo.DPOConfig, None, [*base, override]))
    assert not out.exists()


def test_cross_field_and_run_dir_problems_are_refused(world, tmp_path):
    out, base = world
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.1: conservative DPO applies to loss=sigmoid only"):
        dpo.run(load_config(dpo.DPOConfig, None, [*base, "dpo.loss=ipo", "dpo.label_smoothing=0.1"]))
    (tmp_path / "not_sft").mkdir()
    with pytest.raises(ConfigError, match=r"sft_run=.*not_sft.* is not a finished sft run: it has no adapters/sft"):
        dpo.run(load_config(dpo.DPOConfig, None, [*base, f"sft_run={tmp_path / 'not_sft'}"]))
    assert not out.exists()
    with pytest.raises(RuntimeError, match="tripwire"):  # the baseline is valid
        dpo.run(load_config(dpo.DPOConfig, None, base))


def test_cli_config_dpo_prints_every_key():
    r = subprocess.run([sys.executable, "-m", "align.cli", "config", "dpo"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for key in ("beta: 0.1", "loss: sigmoid", "label_smoothing: 0.0", "reference: precompute", "init: sft_copy",
                "kl_prompts: 32"):
        assert key in r.stdout
