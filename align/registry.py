"""The stages ``align`` runs, in one place: the command line (align/cli.py), the generated config
reference (align/docs.py) and the pipeline (align/demo/pipeline.py) read this table, so adding a stage
touches only this list and the stage's own module."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


def module_available(module: str) -> bool:
    """Whether ``module`` can be imported here (optional parts may be missing)."""
    import importlib.util
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Stage:
    name: str          # the command: ``align NAME``
    module: str        # the module that holds its config class and run function
    config_name: str   # its config dataclass
    help: str          # one line for ``align --help``
    run_name: str = "run"
    policy: bool = False  # a policy-optimisation stage the pipeline can end with

    def available(self) -> bool:
        return module_available(self.module)

    @property
    def config(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def run(self) -> Callable[[Any], dict]:
        return getattr(importlib.import_module(self.module), self.run_name)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "align.stages.sft", "SFTConfig", "Stage 1: instruction tuning of an adapter set"),
    Stage("reward", "align.stages.reward", "RewardConfig", "Stage 2: reward model on ranked comparisons"),
    Stage("ppo", "align.stages.ppo", "PPOConfig", "Stage 3: PPO against the reward model, KL to the SFT policy",
          policy=True),
    Stage("dpo", "align.stages.dpo", "DPOConfig",
          "DPO on preference pairs and rankings, the SFT policy as reference", policy=True),
    Stage("grpo", "align.stages.grpo", "GRPOConfig",
          "GRPO / Dr. GRPO: group-relative advantages, KL to the SFT policy in the loss", policy=True),
    Stage("rloo", "align.stages.rloo", "RLOOConfig",
          "RLOO: leave-one-out baseline, KL to the SFT policy in the reward", policy=True),
    Stage("eval", "align.evaluate", "EvalConfig", "Compare two policies on held-out prompts"),
    Stage("pipeline", "align.demo.pipeline", "PipelineConfig", "Run SFT -> reward -> PPO (the quickstart) end to end"),
)}

POLICY_STAGES = tuple(n for n, s in STAGES.items() if s.policy)

# commands with their own argument parsers (``module.main(argv)``), not stages
TOOLS = {"export": ("align.export", "Export a run's policy, SFT or reward role (hf merged, peft, gguf)"),
         "generate": ("align.generate", "Sample answers from a run's policy (or an exported model)"),
         "preview": ("align.preview", "Show what an SFT config trains: its first examples with the loss-bearing "
                                      "tokens marked")}
