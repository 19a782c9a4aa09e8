"""Shared-prompt passes and shared-trunk roles: the same log-probs, values, scores and gradients as
the unshared computation (float32, CPU), for every adapter method and the block layouts align
supports, with fewer backbone passes."""
import pytest
import torch

from align.adapters import AdapterConfig
from align.model import AlignModel
from align.scoring import response_stats
from align.demo.tiny import build_tiny_model, tiny_config
from tests.test_arch_fused import METHODS as ALL_METHODS

METHODS = {m: c for m, c in ALL_METHODS.items() if m not in ("full", "top_k")}   # the methods that share a backbone
VOCAB = 96


def _model(family: str, method: str, seed: int = 0) -> AlignModel:
    extra = {"sliding_window": 4} if family == "gemma3_text" else {}
    m = AlignModel(build_tiny_model(tiny_config(family, VOCAB, hidden=32, heads=4, **extra), seed=seed))
    m.add_adapter("pol", METHODS[method])
    m.add_adapter("rew", AdapterConfig(method="lora", r=2, alpha=4))
    m.add_head("value")
    m.add_head("reward")
    m.add_role("policy", ["pol"])
    m.add_role("value", ["pol"], head="value")
    m.add_role("reward", ["rew"], head="reward")
    m.set_trainable(["pol", "rew", "value", "reward"])
    torch.manual_seed(seed + 1)
    with torch.no_grad():   # LoRA's B and zero-initialised gates start at 0: give every parameter a path
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _groups(n_prompts: int = 3, group: int = 4, q: int = 9, r: int = 6, seed: int = 0):
    """``n_prompts`` left-padded prompts, each repeated ``group`` times (rows interleaved, as a
    shuffled minibatch would hold them), with right-padded responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (n_prompts, q), generator=g)
    pmask = torch.ones(n_prompts, q, dtype=torch.long)
    pmask[0, :3] = 0
    pmask[1, :1] = 0
    order = torch.arange(n_prompts).repeat(group)[torch.randperm(n_prompts * group, generator=g)]
    query, qmask = prompts[order].clone(), pmask[order].clone()
    query[qmask == 0] = 0
    resp = torch.randint(3, VOCAB, (len(order), r), generator=g)
    lengths = torch.randint(1, r + 1, (len(order),), generator=g)
    rmask = torch.arange(r)[None] < lengths[:, None]
    resp[~rmask] = 0
    return query, qmask, resp, rmask


def _stats_and_grads(m: AlignModel, batch, shared: bool, calls: list | None = None):
    m.zero_grad(set_to_none=True)
    before = m.passes
    hook = m.backbone.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True) \
        if calls is not None else None
    st = response_stats(m, *batch, ("policy", "value", "reward"), 0.7, entropy=True, shared_prompt=shared)
    if hook is not None:
        hook.remove()
    passes = m.passes - before
    loss = (st["policy"]["logprobs"] * batch[3]).sum() + st["value"]["values"].pow(2).sum() + st["reward"]["score"].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return st, grads, passes


def _assert_same(a, b, atol):
    for role in a:
        for k in a[role]:
            torch.testing.assert_close(a[role][k], b[role][k], rtol=1e-4, atol=atol, msg=f"{role}/{k}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_unshared_stats_and_gradients_with_the_prompt_run_once_per_group(method):
    m = _model("llama", method)
    batch = _groups()
    ref_calls, calls = [], []
    ref, ref_grads, ref_passes = _stats_and_grads(m, batch, shared=False, calls=ref_calls)
    got, grads, passes = _stats_and_grads(m, batch, shared=True, calls=calls)
    _assert_same(ref, got, atol=2e-5)
    virtual = 3 if method in ("prompt", "ptuning") else 0
    assert ref_calls == [(12, virtual + 15), (12, 15)]
    # each stack: the 3 distinct prompts once (virtual tokens in front), then the 12 responses
    assert calls == [(3, virtual + 9), (12, 6), (3, 9), (12, 6)]
    assert set(grads) == set(ref_grads) and len(grads) > 4
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, msg=n)
    # policy and value share the adapters "pol": one pass for both, one for the reward
    assert ref_passes == passes == 2


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "llama_adapter"])
def test_under_gradient_checkpointing_the_prompt_is_shared_too(method):
    """Checkpointed layers run again in the backward: the prompt's keys/values recorded in the
    forward are put back for that (no cache object, which transformers drops under checkpointing)."""
    m = _model("llama", method)
    m.enable_gradient_checkpointing()
    batch = _groups()
    ref_calls, calls = [], []
    ref, ref_grads, _ = _stats_and_grads(m, batch, shared=False, calls=ref_calls)
    layer_calls = []
    hook = m.backbone.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: layer_calls.append(1))
    got, grads, _ = _stats_and_grads(m, batch, shared=True, calls=calls)
    hook.remove()
    virtual = 3 if method == "prompt" else 0
    assert calls == [(3, virtual + 9), (12, 6), (3, 9), (12, 6)]   # each stack: its prompts once, then the rows
    assert len(layer_calls) == 8   # 4 passes in the forward, each run again in the backward (checkpointed)
    _assert_same(ref, got, atol=2e-5)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, msg=n)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3", "gpt_neox", "gpt2"])
def test_every_block_layout_gives_the_unshared_stats(family):
    m = _model(family, "lora")
    batch = _groups(q=7, r=5)   # gemma3_text: a sliding window of 4, shorter than the sequences
    ref, ref_grads, _ = _stats_and_grads(m, batch, shared=False)
    got, grads, _ = _stats_and_grads(m, batch, shared=True)
    _assert_same(ref, got, atol=2e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, msg=n)


def test_the_plan_shares_only_equal_prompts_and_steps_aside_where_it_saves_nothing():
    m = _model("llama", "lora")
    query, qmask, resp, rmask = _groups(n_prompts=3, group=2)
    ids, mask = torch.cat([query, resp], 1), torch.cat([qmask, rmask.long()], 1)
    first, inverse = m.shared_prompt_plan(ids, mask, query.shape[1])
    assert len(first) == 3
    assert torch.equal(query[first][inverse], query) and torch.equal(qmask[first][inverse], qmask)
    assert torch.equal(inverse[first], torch.arange(3))   # each representative is its own group's row
    same_ids_other_mask = qmask.clone()
    same_ids_other_mask[first[2], -1] = 0     # equal ids, a different mask: not the same prompt
    assert len(m.shared_prompt_plan(ids, torch.cat([same_ids_other_mask, rmask.long()], 1), query.shape[1])[0]) == 4
    assert m.shared_prompt_plan(ids[first], mask[first], query.shape[1]) is None   # all distinct
    assert m.shared_prompt_plan(ids, mask, ids.shape[1]) is None                   # nothing after the prompt


def test_a_head_role_on_its_own_stack_and_logits_for_every_role_when_asked():
    m = _model("llama", "lora")
    query, qmask, resp, rmask = _groups()
    ids, mask = torch.cat([query, resp], 1), torch.cat([qmask, rmask.long()], 1)
    with torch.no_grad():
        joint = m(ids, mask, roles=("value", "policy"), logits=True)
        alone = {r: m(ids, mask, role=r, logits=True) for r in ("value", "policy")}
        default = m(ids, mask, roles=("value", "reward"))
    for r in alone:
        torch.testing.assert_close(joint[r].logits, alone[r].logits)
    torch.testing.assert_close(joint["value"].values, alone["value"].values)
    assert joint["policy"].values is None
    assert default["value"].logits is None and default["reward"].logits is None   # heads only, as before


# ------------------------------------------------------------------------------ in the stages
def test_minibatches_hold_whole_groups_when_prompts_are_shared():
    from types import SimpleNamespace

    from align.stages import grpo, online

    def perm(share, group=4, minibatch=8, batch=16):
        loop = SimpleNamespace(a=grpo.GRPOAlgoConfig(rollout_batch_size=batch, group_size=group, share_prompt=share),
                               split=SimpleNamespace(minibatch=minibatch))
        return online.OnlineLoop.permutation(loop, 3, 1)
    p = perm(True)
    assert sorted(p.tolist()) == list(range(16))
    for mb in p.view(2, 8):   # each minibatch: two whole groups of 4 consecutive rollout rows
        groups = (mb // 4).view(2, 4)
        assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == 2
    row_by_row = torch.randperm(16, generator=torch.Generator().manual_seed(0 * 7919 + 3 * 131 + 1))
    assert torch.equal(perm(False), row_by_row)             # as before: row by row
    assert torch.equal(perm(True, group=4, minibatch=6, batch=12),
                       torch.randperm(12, generator=torch.Generator().manual_seed(3 * 131 + 1)))  # groups do not fit


def _grpo_run(tmp_path, sft, prompts, *extra, name):
    from align.config import load_config
    from align.stages import grpo
    grpo.run(load_config(grpo.GRPOConfig, None, [
        f"output_dir={tmp_path / name}", f"sft_run={sft}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
        "reward_fn=tests.ppo_helpers:count_target", "grpo.iterations=2", "grpo.rollout_batch_size=16",
        "grpo.group_size=4", "grpo.micro_batch_size=16", "grpo.response_length=5", "grpo.lr=1e-2",
        "grpo.temperature=1.0", "grpo.rollout_logprobs=recompute", "eval.num_prompts=4", "tracking.wandb=false",
        *extra]))
    return tmp_path / name


def test_grpo_trains_the_same_adapters_with_the_prompt_run_once_per_group(tiny_llama, tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    import tests.ppo_helpers as H
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)
    rows = []
    real = AlignModel._shared_trunk

    def spy(self, input_ids, *args):
        rows.append(input_ids.shape[0])
        return real(self, input_ids, *args)
    monkeypatch.setattr(AlignModel, "_shared_trunk", spy)
    runs = {s: _grpo_run(tmp_path, sft, prompts, f"grpo.share_prompt={s}", name=str(s))
            for s in (False, True)}
    # rollout: policy and reference; update: the policy; each of 2 iterations, 16 rows in 4 groups
    assert rows == [16] * 6
    a, b = (load_file(runs[s] / "adapters" / "policy" / "adapter_model.safetensors") for s in (False, True))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m = {s: [json.loads(x) for x in (runs[s] / "metrics.jsonl").read_text().splitlines() if "passes/update" in x]
         for s in runs}
    assert [x["passes/rollout"] for x in m[True]] == [2, 2] and [x["passes/update"] for x in m[True]] == [1, 1]
    for x, y in zip(m[False], m[True]):
        assert x["objective/scores"] == y["objective/scores"]
        assert x["policy/loss"] == pytest.approx(y["policy/loss"], abs=1e-5)


def _ppo_passes(tmp_path, sft, rm, prompts, share: bool, logprobs: str) -> dict:
    import json

    from align.config import load_config
    from align.stages import ppo
    run = tmp_path / f"ppo_{share}_{logprobs}"
    ppo.run(load_config(ppo.PPOConfig, None, [
        f"output_dir={run}", f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}",
        f"data.eval_prompts={prompts}", "value.init=reward", f"value.share_policy={share}", "ppo.iterations=1",
        "ppo.rollout_batch_size=8", "ppo.micro_batch_size=4", "ppo.num_minibatches=1", "ppo.num_ppo_epochs=2",
        "ppo.response_length=4", f"ppo.rollout_logprobs={logprobs}", "eval.num_prompts=2", "tracking.wandb=false"]))
    return next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "passes/update" in x)


def test_a_value_head_on_the_policys_adapters_takes_no_pass_of_its_own(tiny_llama, tmp_path):
    import tests.ppo_helpers as H
    sft, rm = H.fake_sft_run(tiny_llama, tmp_path / "sft"), H.fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 2)
    own, shared = (_ppo_passes(tmp_path, sft, rm, prompts, s, "recompute") for s in (False, True))
    # rollout, 2 micro-batches: policy, reference, value, reward | policy+value, reference, reward
    assert own["passes/rollout"] == 8 and shared["passes/rollout"] == 6
    # update, 2 epochs x 2 chunks: value then policy | one pass for both
    assert own["passes/update"] == 8 and shared["passes/update"] == 4
    assert shared["value/explained_variance"] == shared["value/explained_variance"]   # finite, logged
    own, shared = (_ppo_passes(tmp_path, sft, rm, prompts, s, "sample") for s in (False, True))
    # the sampler's log-probs, and with a shared trunk its values: reference, value, reward | reference, reward
    assert own["passes/rollout"] == 6 and shared["passes/rollout"] == 4


def test_the_sampler_reads_the_values_a_scoring_pass_gives(monkeypatch):
    from types import SimpleNamespace

    import align.scoring as scoring
    m = _model("llama", "lora")
    monkeypatch.setattr(scoring, "specials", lambda tok: SimpleNamespace(stop_ids=[5]))
    resp = scoring.generate(m, [[7, 8, 9, 10], [11, 12], [7, 8, 9, 10]], SimpleNamespace(pad_token_id=0), "cpu",
                            role="policy", max_new_tokens=6, temperature=0.9, row_seeds=[1, 2, 3], head="value",
                            shared_prompt=True)
    with torch.no_grad():
        st = response_stats(m, resp.query, resp.query_mask, resp.response, resp.response_mask, ("value",), 0.9)
    mask = resp.response_mask
    torch.testing.assert_close(resp.sample_values[mask], st["value"]["values"][mask], rtol=1e-4, atol=1e-5)
    assert resp.sample_values.shape == resp.response.shape and float(resp.sample_values[mask].abs().sum()) > 0


def test_stop_gradient_keeps_the_value_loss_out_of_the_policys_adapters(tiny_llama, tmp_path):
    import tests.ppo_helpers as H
    from align.config import ConfigError, load_config
    from align.stages import ppo
    from tests.conftest import load
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    grads = {}
    for stop in (False, True):
        cfg = load_config(ppo.PPOConfig, None, [f"output_dir={tmp_path / 'x'}", f"sft_run={sft}",
                                                "reward_fn=tests.ppo_helpers:count_target", "value.init=fresh",
                                                "value.share_policy=true", f"value.stop_gradient={stop}"])
        model, tok = load(tiny_llama)
        ppo.build_roles(model, cfg)
        with torch.no_grad():
            model.heads["value"].linear.weight.normal_()   # a fresh head is 0: give the trunk a gradient path
            for p in model.adapters["policy"].parameters():
                p.add_(0.05 * torch.randn_like(p))
        model(torch.tensor([tok("the happy dog").input_ids]), role="value").values.sum().backward()
        grads[stop] = (sum(float(p.grad.abs().sum()) for p in model.adapters["policy"].parameters()
                           if p.grad is not None), float(model.heads["value"].linear.weight.grad.abs().sum()))
    assert grads[False][0] > 0 and grads[True][0] == 0      # the trunk learns from the value loss only without it
    assert grads[False][1] > 0 and grads[True][1] > 0       # the head always does
    with pytest.raises(ConfigError, match="value.stop_gradient=true is for value.share_policy=true"):
        ppo.run(load_config(ppo.PPOConfig, None, [f"output_dir={tmp_path / 'y'}", f"sft_run={sft}",
                                                  "reward_fn=tests.ppo_helpers:count_target", "value.init=fresh",
                                                  "value.stop_gradient=true"]))
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "llama_adapter"])
def test_sampling_prefills_each_prompt_once_and_draws_the_same_tokens(method):
    from align.generation import sample
    m = _model("llama", method)
    query, qmask, _, _ = _groups(n_prompts=2, group=3)
    calls = []
    hook = m.backbone.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    out = {}
    for shared in (False, True):
        calls.clear()
        out[shared] = sample(m, query, qmask, role="policy", max_new_tokens=6, temperature=0.9,
                             row_seeds=list(range(6)), stop_token_id=5, shared_prompt=shared)
        prefill = calls[0]
    hook.remove()
    assert prefill[0] == 2 and calls[1][0] == 6           # 2 prompts prefilled, 6 rows decoded
    assert torch.equal(out[False].tokens, out[True].tokens)
    torch.testing.assert_close(out[False].logprobs, out[True].logprobs, rtol=1e-4, atol=1e-5)


def test_a_critic_on_the_policys_trunk_resumes_exactly(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    import tests.ppo_helpers as H
    from align.config import load_config
    from align.stages import ppo
    sft, rm = H.fake_sft_run(tiny_llama, tmp_path / "sft"), H.fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 4)

    def run(name, *extra):
        return ppo.run(load_config(ppo.PPOConfig, None, [
            f"output_dir={tmp_path / name}", f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}",
            f"data.eval_prompts={prompts}", "value.share_policy=true", "ppo.iterations=4", "ppo.save_every=1",
            "ppo.rollout_batch_size=8", "ppo.micro_batch_size=4", "ppo.response_length=5", "ppo.lr=1e-2",
            "eval.num_prompts=2", "tracking.wandb=false", *extra]))
    run("full")
    assert run("killed", "ppo.stop_after_iterations=2") == {"stopped_at": 2}
    run("killed", "resume=true")
    for sub in ("adapters/policy/adapter_model.safetensors", "heads/value/head.safetensors"):
        a, b = load_file(tmp_path / "full" / sub), load_file(tmp_path / "killed" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
