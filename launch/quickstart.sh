#!/usr/bin/env bash
# Install what is needed, then run the quickstart pipeline: pretrain a tiny backbone, SFT,
# simulated annotation -> import, reward model, PPO, evaluation and report, on the CPU.
# Usage: bash launch/quickstart.sh [output_dir=runs/quickstart] [other overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # W&B: online with a key, else offline
exec align pipeline configs/quickstart.yaml "$@"
