"""Memory per process under DeepSpeed ZeRO-3 as processes are added: does the backbone's share fall?

One PPO iteration (rollout, scoring, update, evaluation on held-out prompts) of ``align ppo`` under
``accelerate launch`` with the shipped ``configs/accelerate/<preset>.yaml``, for each process count
and generation mode; every process reports (the run's ``summary.json`` ``memory``):

* ``backbone_mib``: bytes of backbone parameters the process holds after the run: its ZeRO-3
  partition (``ds_tensor``), or the whole backbone under DDP / ZeRO-2;
* ``peak_rss_mib``: its peak resident memory (``ru_maxrss``), everything included (Python, torch,
  DeepSpeed, the model, transient gathers, and on rank 0 the checkpoint pages it reads while loading:
  with ``zero3_init_flag`` transformers reads the checkpoint on rank 0 only and scatters it module by
  module).

``--generation gather`` is ``model.zero3_gather_for_generation=true`` (the default: every parameter
gathered for the whole sampling loop), ``by_layer`` is ``false`` (DeepSpeed fetches each module's
parameters as it runs). ZeRO-3 rows run with DeepSpeed's residency limits scaled to this model
(``--max-live``: at most that many parameters fetched at once, each released when its module is
done; the shipped 1e9 keeps any model under a billion parameters fetched once it has run) and with
gradient checkpointing (without it, autograd keeps the weights every layer gathered in the forward
alive until the backward, so during the update a process holds the whole frozen backbone again:
measured on 100m, 2 processes, +400 MiB in the update without, +77 MiB with). On CPU the processes
share the machine's cores and memory (gloo); the figures are per process.

    python benchmarks/bench_zero3_memory.py --size 100m --procs 1,2,4 --presets zero3,zero2 \
        --generation by_layer,gather --out benchmarks/results/zero3_memory_100m_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import ROOT, WORK, backbone_params, machine, model_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_runs(backbone: Path, work: Path) -> tuple[Path, Path, Path]:
    """An SFT run dir (identity LoRA), a reward run dir (a fixed random LoRA reward role and head)
    and a prompts file, as the stages leave them."""
    import torch

    from align.adapters import AdapterConfig
    from align.adapters.peft_format import save_adapter, save_head
    from align.backbone import load_backbone, load_tokenizer
    from align.model import AlignModel
    sft, rm, prompts = work / "sft", work / "reward", work / "prompts.jsonl"
    if (rm / "roles.json").exists():
        return sft, rm, prompts
    tok = load_tokenizer(backbone)
    model = AlignModel(load_backbone(backbone, tokenizer=tok))
    torch.manual_seed(0)
    model.add_adapter("sft", AdapterConfig(method="lora", r=8, alpha=16))
    save_adapter(model, "sft", sft / "adapters" / "sft")
    model.add_adapter("reward", AdapterConfig(method="lora", r=8, alpha=16))
    with torch.no_grad():
        for p in model.adapters["reward"].parameters():
            p.normal_(0, 0.02)
    model.add_head("reward")
    save_head(model, "reward", rm / "heads" / "reward",
              extra={"normalisation": {"mean": 0.0, "std": 1.0, "source": "benchmark", "n": 0}})
    save_adapter(model, "reward", rm / "adapters" / "reward")
    (rm / "roles.json").write_text(json.dumps(
        {"reward": {"adapters": [{"name": "reward", "dir": "adapters/reward"}], "head": "heads/reward"}}))
    for d in (sft, rm):
        (d / "backbone.json").write_text(json.dumps({"path": str(backbone), "fingerprint": model.fingerprint}))
    words = "happy sad quick lazy bright dark warm cold".split()
    prompts.write_text("".join(json.dumps({"prompt": f"the {w} dog and the {v} cat"}) + "\n"
                               for w in words for v in words))
    return sft, rm, prompts


def low_memory_zero3(path: Path, max_live: float) -> Path:
    """The shipped zero3.json with DeepSpeed's residency limits scaled down to ``max_live``
    parameters: at most that many fetched at once, released as soon as their module is done
    (reuse distance 0), small prefetches. The shipped values (1e9) keep a whole model this size
    fetched once it has run."""
    cfg = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"].update({"stage3_max_live_parameters": max_live, "stage3_max_reuse_distance": 0,
                                     "stage3_prefetch_bucket_size": max_live / 10})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_one(preset: str, procs: int, generation: str, sft: Path, rm: Path, prompts: Path, out: Path,
            rollout: int, response_length: int, timeout: int, ds_config: Path | None = None,
            checkpointing: bool = True) -> dict:
    # large allocations straight from mmap, so memory freed is returned and the peak RSS follows
    # the tensors alive (glibc otherwise keeps freed gather buffers in its heap)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{preset}.yaml"), "--num_processes", str(procs),
           "--main_process_port", str(free_port())]
    if ds_config is not None:
        cmd += ["--deepspeed_config_file", str(ds_config)]
    cmd += ["-m", "align.cli", "ppo",
           f"output_dir={out}", f"sft_run={sft}", f"reward_run={rm}", f"data.prompts={prompts}",
           f"data.eval_prompts={prompts}", "ppo.iterations=1", f"ppo.rollout_batch_size={rollout}",
           f"ppo.micro_batch_size={max(1, rollout // (2 * procs))}", "ppo.num_minibatches=2",
           f"ppo.response_length={response_length}", "eval.num_prompts=8", "tracking.wandb=false",
           f"model.zero3_gather_for_generation={str(generation == 'gather').lower()}",
           f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{preset} x{procs} {generation} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    mem = json.loads((out / "summary.json").read_text())["memory"]
    return {"preset": preset, "procs": procs, "generation": generation, "wall_s": round(time.time() - t0, 1),
            "memory": mem}


def table(rows: list[dict], backbone_mib: float) -> str:
    lines = ["| preset | processes | generation | backbone held per process (MiB) | peak RSS rank 0 (MiB) | "
             "peak RSS other ranks, max (MiB) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = sorted(r["memory"], key=lambda x: x["rank"])
        held = max(x["backbone_mib"] for x in m)
        others = max((x["peak_rss_mib"] for x in m[1:]), default=None)
        lines.append(f"| {r['preset']} | {r['procs']} | {r['generation']} | {held:.1f} ({held / backbone_mib:.2f}x) | "
                     f"{m[0]['peak_rss_mib']:.0f} | {'-' if others is None else f'{others:.0f}'} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="100m")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--presets", default="zero3")
    ap.add_argument("--generation", default="by_layer,gather")
    ap.add_argument("--rollout", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--max-live", type=float, default=1e7,
                    help="ZeRO-3 rows: stage3_max_live_parameters (0: the shipped zero3.json as it is)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="without model.gradient_checkpointing (under ZeRO-3 the update then keeps every "
                         "gathered layer alive until the backward)")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in OUT.json (same size) and add this run's")
    ap.add_argument("--work", default=str(WORK / "zero3_memory"))
    a = ap.parse_args(argv)
    backbone = model_dir(a.size)
    work = Path(a.work) / a.size
    sft, rm, prompts = role_runs(backbone, work)
    backbone_mib = backbone_params(backbone) * 4 / 2**20
    rows = []
    if a.append and a.out and Path(a.out + ".json").exists():
        rows = json.loads(Path(a.out + ".json").read_text())["rows"]
    for preset in a.presets.split(","):
        gens = a.generation.split(",") if preset.startswith("zero3") or preset == "fsdp2" else ["-"]
        for procs in (int(x) for x in a.procs.split(",")):
            for gen in gens:
                if procs == 1 and gen == "gather" and "by_layer" in gens:
                    continue  # one process holds the whole backbone either way
                out = work / "runs" / f"{preset}_{procs}_{gen}"
                if out.exists():
                    import shutil
                    shutil.rmtree(out)
                ds = (low_memory_zero3(work / "zero3_max_live.json", a.max_live)
                      if preset.startswith("zero3") and a.max_live else None)
                row = run_one(preset, procs, gen, sft, rm, prompts, out, a.rollout, a.response_length, a.timeout,
                              ds, not a.no_checkpointing)
                rows.append(row)
                print(json.dumps(row), flush=True)
    md = (f"# Memory per process, one PPO iteration, `{a.size}` backbone ({backbone_mib:.0f} MiB of float32 "
          f"weights), {machine()}\n\n`python benchmarks/bench_zero3_memory.py {' '.join(argv or sys.argv[1:])}` "
          f"(with --append: rows of earlier runs of it kept); "
          f"ZeRO-3 rows with stage3_max_live_parameters={a.max_live:g} (0: as shipped), reuse distance 0; "
          f"gradient checkpointing {'off' if a.no_checkpointing else 'on'}; MALLOC_MMAP_THRESHOLD_=131072.\n\n"
          + table(rows, backbone_mib) + "\n")
    print(md)
    if a.out:
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".json").write_text(json.dumps({"size": a.size, "backbone_mib": backbone_mib, "rows": rows},
                                                    indent=1))
    return rows


if __name__ == "__main__":
    main()
