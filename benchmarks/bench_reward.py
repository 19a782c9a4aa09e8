"""Reward-model step: align against TRL's RewardTrainer with a peft LoRA of equal rank.

    python benchmarks/bench_reward.py --size 100m --reps 3

See train_bench.py for what is matched on both sides and how a step is timed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_bench import main  # noqa: E402

if __name__ == "__main__":
    main("reward")
