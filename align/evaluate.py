"""``align eval``: compare two policies on held-out prompts.

A policy is ``sft`` (the SFT run's adapters) or a PPO run dir (its ``adapters/policy``). Both are
loaded as roles over one backbone next to the reference (SFT) and reward roles. For each policy:
mean gold score (when the task has a gold scorer) with its standard error, mean learned reward,
KL to the SFT policy; and win rates of B over A by gold and by the reward model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from align.config import ConfigError


@dataclass
class EvalConfig:
    sft_run: str = ""                    # the SFT run dir (backbone and reference policy)
    reward_run: str = ""                 # the reward run dir (learned reward)
    policy_a: str = "sft"                # sft, or a PPO run dir
    policy_b: str = ""                   # a PPO run dir (or sft)
    prompts: str = ""                    # held-out prompts (records with a prompt)
    num_prompts: int = 256               # how many of them
    temperature: float = 1.0             # sampling temperature
    response_length: int = 48            # max new tokens
    gold: str = ""                       # "module:function(prompts, responses, ended) -> list[float]"
    chat_template: Optional[str] = None  # Jinja template for conversational prompts (tokenizers without one)
    dtype: Optional[str] = None          # backbone dtype; default: the SFT run's model.dtype
    device: Optional[str] = None         # default: cuda when available, else cpu
    trust_remote_code: bool = False      # never on unless asked
    seed: int = 0                        # sampling seed (the same for both policies)
    output: str = ""                     # optional: write the comparison JSON here


def _policy_dir(spec: str, sft_run: str) -> Path:
    if spec == "sft":
        return Path(sft_run) / "adapters" / "sft"
    return Path(spec) / "adapters" / "policy"


def build(cfg: EvalConfig):
    from align.adapters.peft_format import load_adapter, load_head
    from align.config import ModelConfig
    from align.distributed import Runtime
    from align.stages.common import backbone_from_run, load_model
    if not (cfg.sft_run and cfg.reward_run and cfg.policy_b and cfg.prompts):
        raise ConfigError("sft_run, reward_run, policy_b and prompts are required")
    record = backbone_from_run(cfg.sft_run)
    rt = Runtime(device=cfg.device)
    mcfg = ModelConfig(path=record["path"], dtype=cfg.dtype or record.get("dtype", "float32"),
                       trust_remote_code=cfg.trust_remote_code)
    tok, model = load_model(record["path"], mcfg, rt.device, chat_template=cfg.chat_template)
    load_adapter(model, "sft", Path(cfg.sft_run) / "adapters" / "sft")
    model.add_role("reference", ["sft"])
    for name, spec in (("a", cfg.policy_a), ("b", cfg.policy_b)):
        if spec == "sft":
            model.add_role(name, ["sft"])
        else:
            load_adapter(model, f"policy_{name}", _policy_dir(spec, cfg.sft_run))
            model.add_role(name, [f"policy_{name}"])
    rr = json.loads((Path(cfg.reward_run) / "reward_role.json").read_text())
    stack = []
    for e in rr["adapters"]:
        d = Path(e["dir"])
        d = d if d.is_absolute() else Path(cfg.reward_run) / d
        n = "rm_" + e["name"]
        load_adapter(model, n, d)
        stack.append(n)
    load_head(model, "reward", Path(cfg.reward_run) / rr["head"])
    model.add_role("reward", stack, head="reward")
    model.eval()
    return model, tok, rt


def held_out_prompts(cfg: EvalConfig, tok) -> list[dict]:
    """The first ``num_prompts`` records' prompts as text (conversations through the chat template)
    and token ids."""
    from align.data.common import read_records
    from align.data.sft import encode_prompts
    return encode_prompts(read_records(cfg.prompts)[:cfg.num_prompts], cfg.prompts, tok, cfg.chat_template)


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


@torch.no_grad()
def compare(cfg: EvalConfig) -> dict:
    from align.stages.ppo import load_gold, policy_eval_batch
    model, tok, rt = build(cfg)
    prompts = held_out_prompts(cfg, tok)
    gold_fn = load_gold(cfg.gold)
    res = {}
    for name in ("a", "b"):
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 4242)
        out = policy_eval_batch(model, model, prompts, tok, rt, role=name, temperature=cfg.temperature,
                                response_length=cfg.response_length, generator=gen)
        entry = {"reward_mean": float(out["reward"].mean()), "reward_sem": _sem(out["reward"]),
                 "kl_to_sft_mean": float(out["kl"].mean()), "responses": out["responses"],
                 "_reward": out["reward"]}
        if gold_fn is not None:
            g = torch.tensor(gold_fn([p["text"] for p in prompts], out["responses"], out["ended"]), dtype=torch.float)
            entry.update(gold_mean=float(g.mean()), gold_sem=_sem(g), _gold=g)
        entry["stop_rate"] = sum(out["ended"]) / len(out["ended"])
        res[name] = entry
    summary = {"n_prompts": len(prompts), "policy_a": cfg.policy_a, "policy_b": cfg.policy_b}
    for name in ("a", "b"):
        summary[name] = {k: v for k, v in res[name].items() if not k.startswith("_") and k != "responses"}
    summary["win_rate_b_by_reward"] = float(((res["b"]["_reward"] > res["a"]["_reward"]).float()
                                             + 0.5 * (res["b"]["_reward"] == res["a"]["_reward"]).float()).mean())
    if gold_fn is not None:
        gb, ga = res["b"]["_gold"], res["a"]["_gold"]
        summary["win_rate_b_by_gold"] = float(((gb > ga).float() + 0.5 * (gb == ga).float()).mean())
        diff = gb - ga
        summary["gold_diff_mean"], summary["gold_diff_sem"] = float(diff.mean()), _sem(diff)
    summary["samples"] = [{"prompt": p["text"], "a": ra, "b": rb} for p, ra, rb in
                          zip(prompts[:8], res["a"]["responses"][:8], res["b"]["responses"][:8])]
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def rm_accuracy_vs_gold(cfg: EvalConfig, k: int = 4) -> dict:
    """Reward-model accuracy against gold labels on held-out prompts: K SFT samples per prompt,
    every pair with different gold scores, correct when the RM orders it as gold does."""
    from align.data.preferences import sequence_rewards
    from align.generation import sample
    from align.rl.rollout import response_mask_from_lengths, truncate_after_stop
    from align.stages.common import left_pad
    from align.stages.ppo import load_gold
    from align.tokens import specials
    model, tok, rt = build(cfg)
    gold_fn = load_gold(cfg.gold)
    prompts = held_out_prompts(cfg, tok)
    texts = [p["text"] for p in prompts]
    query, qmask = left_pad([p["ids"] for p in prompts], tok.pad_token_id, rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 777)
    stops = specials(tok).stop_ids
    rewards, golds = [], []
    for _ in range(k):
        s = sample(model, query, qmask, role="reference", max_new_tokens=cfg.response_length,
                   temperature=cfg.temperature, stop_token_id=stops, pad_token_id=tok.pad_token_id,
                   generator=gen)
        resp, seq_len, has_stop = truncate_after_stop(s.tokens, stops, tok.pad_token_id)
        rmask = response_mask_from_lengths(seq_len, resp.shape[1])
        full = torch.cat([query, resp], 1)
        mask = torch.cat([qmask, rmask.long()], 1)
        with model.use("reward"):
            rewards.append(sequence_rewards(model(full, mask).values.float(), mask).cpu())
        decoded = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, rmask)]
        golds.append(torch.tensor(gold_fn(texts, decoded, has_stop.tolist()), dtype=torch.float))
    r, g = torch.stack(rewards, 1), torch.stack(golds, 1)
    correct = total = 0
    for i in range(k):
        for j in range(i + 1, k):
            differ = g[:, i] != g[:, j]
            agree = ((r[:, i] > r[:, j]) == (g[:, i] > g[:, j])) & differ
            correct += int(agree.sum())
            total += int(differ.sum())
    return {"rm_accuracy_vs_gold": correct / max(total, 1), "rm_eval_pairs": total}


def run(cfg: EvalConfig) -> dict:
    summary = compare(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    return summary
