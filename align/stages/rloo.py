"""``align rloo``: RLOO (Ahmadian et al. 2024) on PPO's roles without a critic: ``rloo.group_size``
responses per prompt, the KL penalty in the reward, a leave-one-out baseline. Built in
align/stages/grpo.py with GRPO, which shares everything but the advantages and the loss."""
from align.stages.grpo import RLOOAlgoConfig, RLOOConfig
from align.stages.grpo import run_rloo as run

__all__ = ["RLOOConfig", "RLOOAlgoConfig", "run"]
