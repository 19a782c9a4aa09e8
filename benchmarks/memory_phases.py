"""Where a training step's peak resident memory goes: one side of a bench_po / bench_ppo worker run
in-process with a sampling thread (``/proc/self/statm`` every ``--interval`` ms) and the step's
phases (load, sampling, scoring forwards, loss forward/backward, optimizer step) marked by wrapping
the functions that run them. Linux only (it reads /proc).

    python benchmarks/memory_phases.py --size smollm2 --method grpo            # align and TRL, one process each
    python benchmarks/memory_phases.py --size smollm2 --method grpo --chat     # chat-template prompts

For each side it prints, per phase: the resident memory when the phase was first entered, the
highest sample while it (or a phase inside it) ran, and that peak over the entry level. ``imports``
is the resident memory after the side's imports alone (torch, transformers, the trainer modules)
before any model is read: a fixed cost of the libraries, not of the step. The ``peak`` line is the
process's ``ru_maxrss`` (the kernel's own peak; the sampler can miss a spike shorter than its
interval). Results go to ``results/memory_phases_<size>_<method>[_chat].{md,json}``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (dotted path of a function or method to wrap, phase name); inner phases nest inside outer ones.
# Both sides run their backward and optimizer step through accelerate.
BOTH = [("accelerate.Accelerator.backward", "backward"), ("accelerate.optimizer.AcceleratedOptimizer.step", "optimizer step")]
ALIGN_PHASES = {
    "common": [("align.stages.common.load_backbone", "load"), ("align.stages.online.OnlineLoop.prepare", "load"),
               ("align.stages.online.generate", "sample"), ("align.stages.online.score", "score"),
               ("align.stages.online.GroupLoop.chunk_loss", "loss forward"),
               ("align.stages.ppo.PPOLoop.chunk_loss", "loss forward"),
               ("align.stages.online.OnlineLoop.evaluate", "evaluate"),
               ("align.stages.online.OnlineLoop.save_final", "save")],
    "dpo": [("align.stages.dpo.group_logprobs", "score"),
            ("align.stages.dpo.sequence_logprobs", "loss forward")],
}
TRL_PHASES = {
    "common": [("transformers.AutoModelForCausalLM.from_pretrained", "load"),
               ("transformers.Trainer._save", "save")],
    "grpo": [("trl.GRPOTrainer.__init__", "load"), ("trl.GRPOTrainer._generate", "sample"),
             ("trl.GRPOTrainer._generate_and_score_completions", "score"),
             ("trl.GRPOTrainer.compute_loss", "loss forward")],
    "rloo": [("trl.RLOOTrainer.__init__", "load"), ("trl.RLOOTrainer._generate", "sample"),
             ("trl.RLOOTrainer._generate_and_score_completions", "score"),
             ("trl.RLOOTrainer.compute_loss", "loss forward")],
    "dpo": [("trl.DPOTrainer.__init__", "load"), ("trl.DPOTrainer.compute_loss", "loss forward")],
    # trl 1.12's PPOTrainer.train is one function: its sampling is trl's batch_generation
    "ppo": [("trl.experimental.ppo.ppo_trainer.batch_generation", "sample"),
            ("trl.experimental.ppo.PPOTrainer.__init__", "load")],
}


class Sampler:
    """Resident memory sampled on a thread, attributed to the innermost open phase (and, for the
    peaks, to every phase open at that moment)."""

    def __init__(self, interval_ms: float):
        self.interval = interval_ms / 1000
        self.stack: list[str] = []
        self.entry: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self.anon_at_peak: dict[str, float] = {}
        self._fd = os.open("/proc/self/status", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> tuple[float, float]:
        """(resident, of it anonymous) MiB: the rest is file pages, e.g. a memory-mapped weights file."""
        fields = dict(ln.split(":", 1) for ln in os.pread(self._fd, 4096, 0).decode().splitlines() if ":" in ln)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024

    def rss_mb(self) -> float:
        return self.rss()[0]

    def _note(self) -> None:
        r, anon = self.rss()
        for name in set(self.stack) or {"(outside phases)"}:
            if r > self.peak.get(name, 0.0):
                self.peak[name], self.anon_at_peak[name] = r, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._note()

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.entry:
            self.entry[name] = self.rss_mb()
            self.order.append(name)
        self.stack.append(name)
        try:
            yield
        finally:
            self._note()
            self.stack.pop()


def wrap(sampler: Sampler, dotted: str, name: str) -> None:
    """Replace the function at ``dotted`` (module.attr or module.Class.method) by one that runs
    inside ``sampler.phase(name)``."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        break
    fn = getattr(owner, parts[-1])

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sampler.phase(name):
            return fn(*args, **kwargs)
    setattr(owner, parts[-1], wrapped)


def imports(side: str, method: str) -> None:
    """The side's libraries, imported before the sampler's first entry (their fixed cost)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    if side == "align":
        importlib.import_module(f"align.stages.{method}")
    elif method == "ppo":
        import peft  # noqa: F401
        import trl.experimental.ppo  # noqa: F401
    else:
        import peft  # noqa: F401
        import trl
        getattr(trl, {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer", "dpo": "DPOTrainer"}[method])


def bench(method: str):
    """The side-by-side script whose workers run ``method``: bench_ppo.py (TRL 1.12) or bench_po.py."""
    from benchmarks import bench_po, bench_ppo
    return bench_ppo if method == "ppo" else bench_po


def profile(a) -> dict:
    bench_po = bench(a.method)
    t0 = time.time()
    imports(a.which, a.method)
    sampler = Sampler(a.interval)
    base = sampler.rss_mb()
    table = (ALIGN_PHASES if a.which == "align" else TRL_PHASES)
    for dotted, name in BOTH + table["common"] + (table.get(a.method, []) if a.which == "trl" or a.method == "dpo" else []):
        if a.which == "align" and a.method == "dpo" and dotted.startswith("align.stages.online"):
            continue
        try:
            wrap(sampler, dotted, name)
        except AttributeError:   # not in this library version: the phase is not marked
            print(f"[memory_phases] {dotted}: not found, phase {name!r} not marked", file=sys.stderr)
    sampler.start()
    with sampler.phase("run"):
        out = (bench_po.align_worker if a.which == "align" else bench_po.trl_worker)(a)
    sampler.stop()
    phases = [{"phase": n, "entry_mb": round(sampler.entry[n], 1), "peak_mb": round(sampler.peak.get(n, 0.0), 1),
               "rise_mb": round(sampler.peak.get(n, 0.0) - sampler.entry[n], 1),
               "anon_at_peak_mb": round(sampler.anon_at_peak.get(n, 0.0), 1)} for n in sampler.order]
    return {"side": a.which, "imports_mb": round(base, 1), "phases": phases,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "step_s": out["step_s"], "seconds": round(time.time() - t0, 1), "model": a.model}


def markdown(a, results: dict) -> str:
    lines = ["---", f"measured: {time.strftime('%Y-%m-%d')}", f"machine: {os.cpu_count()} CPU cores, no GPU",
             f"command: python benchmarks/memory_phases.py {' '.join(sys.argv[1:])}", "---",
             f"#### Resident memory by phase: {a.method.upper()} on {a.size}"
             f"{', chat-template prompts' if a.chat and a.method in ('grpo', 'rloo') else ''} (MiB; sampled every "
             f"{a.interval:g} ms)", ""]
    for side, r in results.items():
        lines += [f"**{side}**: imports alone {r['imports_mb']:,.0f}; process peak (ru_maxrss) "
                  f"{r['ru_maxrss_mb']:,.0f}; {r['step_s']:.2f} s/step", "",
                  "| phase | at first entry | peak inside | rise | anonymous at the peak |", "|---|---|---|---|---|"]
        lines += [f"| {p['phase']} | {p['entry_mb']:,.0f} | {p['peak_mb']:,.0f} | {p['rise_mb']:+,.0f} | "
                  f"{p['anon_at_peak_mb']:,.0f} |"
                  for p in r["phases"]]
        lines.append("")
    if len(results) == 2:
        al, tr = results["align"], results["trl"]
        lines.append(f"align / TRL peak: {al['ru_maxrss_mb'] / tr['ru_maxrss_mb']:.2f}; above imports: "
                     f"{(al['ru_maxrss_mb'] - al['imports_mb']) / (tr['ru_maxrss_mb'] - tr['imports_mb']):.2f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from benchmarks.common import WORK, model_dir, prepare_stage_runs, run_worker, trl_python
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="grpo")
    method = pre.parse_known_args(argv)[0].method   # picks the script whose arguments the rest are
    script = bench(method)
    a = script.parse_arguments(argv)
    a.method = method
    if a.worker:
        print(json.dumps(profile(a)))
        return
    model = model_dir(a.size)
    results = {}
    for side in (["align", "trl"] if a.side == "both" else [a.side]):
        wd = WORK / "runs" / f"memphases-{a.size}-{side}-{int(time.time())}"
        wd.mkdir(parents=True, exist_ok=True)
        if side == "align":
            prepare_stage_runs(model, wd)
        python = trl_python(a.trl_python) if side == "trl" and method == "ppo" else sys.executable
        args = ["--which", side, "--workdir", str(wd), "--method", method, "--interval", str(a.interval),
                *script.worker_arguments(a, model)]
        results[side] = run_worker(python, Path(__file__), args)
        print(f"[memory_phases] {side}: {results[side]}", file=sys.stderr)
    name = f"memory_phases_{a.size}_{method}{'_chat' if a.chat else ''}"
    md = markdown(a, results)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    (out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
