#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (slow end-to-end tests included).
# Pass pytest arguments through, e.g. `bash launch/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
