"""On a CUDA device (skipped elsewhere, so CI never runs these): roles, cached generation, gradient
checkpointing and every stage in bf16 behave as on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from align.adapters import AdapterConfig
from align.config import load_config
from tests.conftest import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
METHODS = ["lora", "prefix", "prompt", "ia3", "llama_adapter", "bottleneck"]


def model_with(path, method, device, dtype=torch.float32):
    """The same adapter tensors whatever the device: built on the CPU, then moved."""
    model, tok = load(path)
    torch.manual_seed(0)
    model.add_adapter("a", AdapterConfig(method=method, r=4, num_virtual_tokens=3, adapter_layers=1))
    with torch.no_grad():
        for p in model.adapters["a"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.add_role("a", ["a"])
    return model.to(device=device, dtype=dtype).eval(), tok


@pytest.mark.parametrize("method", METHODS)
def test_role_logits_on_cuda_equal_cpu(tiny_llama, method):
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        cpu = model_with(tiny_llama, method, "cpu")[0](ids, mask, role="a").logits
        gpu = model_with(tiny_llama, method, "cuda")[0](ids.cuda(), mask.cuda(), role="a").logits.cpu()
    real = mask.bool()
    torch.testing.assert_close(gpu[real], cpu[real], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_uncached_greedy_on_cuda(tiny_llama, method):
    from align.generation import sample
    from align.scoring import left_pad
    model, tok = model_with(tiny_llama, method, "cuda")
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids for p in ["the happy dog", "a"]],
                         tok.pad_token_id, "cuda")
    out = sample(model, ids, mask, role="a", max_new_tokens=8, greedy=True,
                 stop_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    seq, m = ids, mask
    with torch.no_grad():
        for t in range(8):  # uncached greedy: the whole sequence every step
            nxt = model(seq, m, role="a").logits[:, -1].argmax(-1)
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    for row in range(2):
        n = int(out.lengths[row])
        assert out.tokens[row, :n].tolist() == seq[row, ids.shape[1]:ids.shape[1] + n].tolist()


def test_stages_run_in_bf16_on_cuda(tiny_llama, tmp_path):
    import align.stages.ppo as ppo
    import align.stages.reward as reward
    import align.stages.sft as sft
    from tests.test_reward import rule_rankings
    from tests.test_sft import synthetic_instructions
    data = synthetic_instructions(tmp_path / "sft.jsonl", n=200)
    sft.run(load_config(sft.SFTConfig, None, [
        f"output_dir={tmp_path / 'sft'}", f"model.path={tiny_llama}", "model.dtype=bfloat16",
        f"data.train={data}", "train.max_steps=20", "train.batch_size=16", "train.lr=1e-2",
        "model.gradient_checkpointing=true", "tracking.wandb=false"]))
    out = reward.run(load_config(reward.RewardConfig, None, [
        f"output_dir={tmp_path / 'rm'}", f"sft_run={tmp_path / 'sft'}", "model.dtype=bfloat16",
        f"data.train={rule_rankings(tmp_path / 'r.jsonl')}", "train.epochs=2", "train.lr=1e-2",
        "tracking.wandb=false", "normalize.num_prompts=8", "normalize.max_new_tokens=4"]))
    assert out["eval/accuracy"] >= 0.8
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"review {i}:"}) + "\n" for i in range(64)))
    res = ppo.run(load_config(ppo.PPOConfig, None, [
        f"output_dir={tmp_path / 'ppo'}", f"sft_run={tmp_path / 'sft'}", f"reward_run={tmp_path / 'rm'}",
        "model.dtype=bfloat16", f"data.prompts={prompts}", "ppo.iterations=3", "ppo.rollout_batch_size=32",
        "ppo.response_length=8", "ppo.temperature=1.0", "eval.num_prompts=8", "tracking.wandb=false"]))
    first = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()][0]
    assert abs(first["objective/kl"]) < 1e-2 and abs(first["policy/first_ratio_mean"] - 1) < 1e-2
    assert res["iterations"] == 3 and torch.isfinite(torch.tensor(res["eval/reward"]))
