"""Gradient checkpointing through the frozen backbone: the adapters get exactly the gradients they
get without it, the layers really are recomputed, and a multi-role forward recomputes each role's
layers under that role's adapters."""
from __future__ import annotations

import pytest
import torch

from align.adapters import AdapterConfig
from tests.conftest import load


def grads_and_calls(path, method: str, checkpointing: bool):
    model, _ = load(path)
    torch.manual_seed(0)
    for name in ("a", "b"):
        model.add_adapter(name, AdapterConfig(method=method, r=4, num_virtual_tokens=3, bottleneck_size=4,
                                                nonlinearity="gelu"))  # relu units can be dead here
        with torch.no_grad():  # away from the identity init, so every tensor gets a gradient
            for p in model.adapters[name].parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.add_role(name, [name], head=None)
    model.add_head("v", init="reward")
    model.add_role("value", ["b"], head="v")
    model.set_trainable(["a", "b", "v"])
    if checkpointing:
        model.enable_gradient_checkpointing()
    calls = []
    model.backbone.base_model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    model.eval()  # as PPO runs: dropout off everywhere, checkpointing still on for grad forwards
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    outs = model(ids, mask, roles=("a", "value"))
    loss = outs["a"].logits.float().logsumexp(-1)[mask.bool()].mean() + outs["value"].values.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # a cached (generation) forward is never checkpointed
        model(ids, mask, role="a")
    return grads, len(calls)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "bottleneck"])
def test_checkpointed_gradients_equal_plain_ones(tiny_llama, method):
    plain, plain_calls = grads_and_calls(tiny_llama, method, False)
    ckpt, ckpt_calls = grads_and_calls(tiny_llama, method, True)
    assert plain_calls == 3            # two roles' forwards + the no-grad one
    assert ckpt_calls == 5             # each grad forward recomputed once in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for k in plain:
        assert plain[k].abs().sum() > 0, k
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_ppo_with_gradient_checkpointing_matches_ppo_without(tiny_llama, tmp_path):
    """The whole PPO stage (policy and value trained in one backward) with model.gradient_checkpointing."""
    from safetensors.torch import load_file

    import align.stages.ppo as ppo
    import tests.ppo_helpers as H
    from align.config import load_config
    sft = H.fake_sft_run(tiny_llama, tmp_path / "sft")
    rm = H.fake_reward_run(tiny_llama, tmp_path / "rm")
    prompts = H.write_prompts(tmp_path / "p.jsonl", [f"the {w} dog" for w in "happy sad quick lazy".split()] * 8)
    for name, gc in (("plain", "false"), ("ckpt", "true")):
        ppo.run(load_config(ppo.PPOConfig, None, [
            f"output_dir={tmp_path / name}", f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}",
            f"data.eval_prompts={prompts}", "ppo.iterations=2", "ppo.rollout_batch_size=16",
            "ppo.micro_batch_size=8", "ppo.response_length=6", "ppo.temperature=1.0", "eval.num_prompts=4",
            "tracking.wandb=false", f"model.gradient_checkpointing={gc}"]))
    for role in ("policy", "value"):
        a = load_file(tmp_path / "plain" / "adapters" / role / "adapter_model.safetensors")
        b = load_file(tmp_path / "ckpt" / "adapters" / role / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        moved = load_file(tmp_path / "sft" / "adapters" / "sft" / "adapter_model.safetensors") if role == "policy" else None
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{role}:{k}")
        if moved is not None:  # the policy really trained
            assert any(not torch.equal(a[k], moved[k]) for k in a if k in moved)
