"""Helpers for PPO tests: run dirs of a finished SFT (and reward) stage over a tiny backbone,
and programmatic rewards."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from align.adapters import AdapterConfig
from align.adapters.peft_format import save_adapter, save_head
from tests.conftest import load


def fake_sft_run(backbone: Path, run_dir: Path, config: AdapterConfig | None = None, seed: int = 0) -> Path:
    """A run dir as the SFT stage leaves it, with a fresh (identity) adapter set."""
    model, _ = load(backbone)
    torch.manual_seed(seed)
    model.add_adapter("sft", config or AdapterConfig(method="lora", r=4, alpha=8))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(model, "sft", run_dir / "adapters" / "sft")
    (run_dir / "backbone.json").write_text(json.dumps({"path": str(backbone), "fingerprint": model.fingerprint}))
    return run_dir


def fake_reward_run(backbone: Path, run_dir: Path, seed: int = 0, mean: float = 0.0, std: float = 1.0) -> Path:
    """A reward run dir with a random (but fixed) LoRA reward role and head."""
    model, _ = load(backbone)
    torch.manual_seed(seed)
    model.add_adapter("reward", AdapterConfig(method="lora", r=4, alpha=8))
    with torch.no_grad():
        for p in model.adapters["reward"].parameters():
            p.normal_(0, 0.1)
    model.add_head("reward")
    save_adapter(model, "reward", run_dir / "adapters" / "reward")
    save_head(model, "reward", run_dir / "heads" / "reward",
              extra={"normalisation": {"mean": mean, "std": std, "source": "test", "n": 0}})
    (run_dir / "roles.json").write_text(json.dumps(
        {"reward": {"adapters": [{"name": "reward", "dir": "adapters/reward"}], "head": "heads/reward"}}))
    (run_dir / "backbone.json").write_text(json.dumps({"path": str(backbone), "fingerprint": model.fingerprint}))
    return run_dir


def write_prompts(path: Path, prompts: list[str]) -> Path:
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return path


TARGET = "e"


def count_target(prompts, responses, ended):
    """Toy reward: how often the letter 'e' appears in the response (capped at 10)."""
    return [min(r.count(TARGET), 10) / 2.0 for r in responses]


BANDIT_TARGETS: set[str] = set()


def bandit_reward(prompts, responses, ended):
    """1 when the one-token response is in BANDIT_TARGETS, else 0."""
    return [1.0 if r in BANDIT_TARGETS else 0.0 for r in responses]


def bandit_optimum(ref_probs: torch.Tensor, reward: torch.Tensor, beta: float) -> dict:
    """Closed form of max_pi E_pi[r] - beta KL(pi || pi_ref): pi* = pi_ref exp(r / beta) / Z."""
    z = (ref_probs * torch.exp(reward / beta)).sum()
    pi = ref_probs * torch.exp(reward / beta) / z
    er = float((pi * reward).sum())
    return {"objective": float(beta * torch.log(z)), "reward": er, "kl": er / beta - float(torch.log(z)), "pi": pi}


_CALLS = {"n": 0}


def nan_on_third_call(prompts, responses, ended):
    """A reward function that goes wrong at its third call (iteration 3): NaN for one response."""
    _CALLS["n"] += 1
    out = [float(len(r)) for r in responses]
    if _CALLS["n"] >= 3:
        out[1] = float("nan")
    return out


def reset_calls() -> None:
    _CALLS["n"] = 0


def one_short(prompts, responses, ended):
    """A reward function that returns one reward too few."""
    return [1.0] * (len(responses) - 1)


def two_args(prompts, responses):
    """Not a reward function: it does not take ``ended``."""
    return [0.0] * len(responses)


SEEN: list = []   # (source, [(prompt text, answer), ...]) of every call of the two scorers below


def answer_reward(prompts, responses, ended, answer):
    """A verifiable reward: how often the record's own ``answer`` letter appears in the response."""
    SEEN.append(("reward", list(zip(prompts, answer))))
    return [float(r.count(a)) for r, a in zip(responses, answer)]


def answer_gold(prompts, responses, ended, **columns):
    """A gold scorer that takes every column: 1 when the response holds the record's answer."""
    SEEN.append(("gold", list(zip(prompts, columns["answer"]))))
    return [float(a in r) for r, a in zip(responses, columns["answer"])]


def picky(prompts, responses, ended):
    """A verifier with an opinion only on prompts about dogs: 1 when the response has an 'e'."""
    return [(1.0 if "e" in r else 0.0) if "dog" in p else None for p, r in zip(prompts, responses)]


def count_target_except_happy(prompts, responses, ended):
    """count_target, but the same score (0) for every response to a prompt about a happy dog: those
    groups carry no advantage (dynamic sampling drops them)."""
    return [0.0 if "happy" in p else min(r.count(TARGET), 10) / 2.0 for p, r in zip(prompts, responses)]
