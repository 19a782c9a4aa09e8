#!/usr/bin/env bash
# Install what is needed, then run the quickstart pipeline: pretrain a tiny backbone, SFT,
# simulated annotation -> import, reward model, PPO, evaluation and report, on the CPU.
# Usage: bash launch/quickstart.sh [output_dir=runs/quickstart] [other overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec align pipeline configs/quickstart.yaml "$@"
