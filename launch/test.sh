#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (slow end-to-end tests included).
# Pass pytest arguments through, e.g. `bash launch/test.sh -m "not slow"`. Test files are spread
# over ALIGN_TEST_WORKERS pytest-xdist workers (default 2; a file stays on one worker, so its
# module-scoped runs are made once; the files start in the order tests/conftest.py gives them, the
# longest first, with one torch thread per worker); `-n 0` runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -n "${ALIGN_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
