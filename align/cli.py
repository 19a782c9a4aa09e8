"""``align`` command line: one sub-command per stage plus the pipeline, import, eval and config."""
from __future__ import annotations

import argparse
import sys

STAGES = {
    "sft": ("align.stages.sft", "SFTConfig", "Stage 1: instruction tuning of an adapter set"),
    "reward": ("align.stages.reward", "RewardConfig", "Stage 2: reward model on ranked comparisons"),
    "ppo": ("align.stages.ppo", "PPOConfig", "Stage 3: PPO against the reward model, KL to the SFT policy"),
    "dpo": ("align.stages.dpo", "DPOConfig", "DPO on preference pairs and rankings, the SFT policy as reference"),
    "grpo": ("align.stages.grpo", "GRPOConfig", "GRPO / Dr. GRPO: group-relative advantages, KL to the SFT policy in the loss"),
    "rloo": ("align.stages.rloo", "RLOOConfig", "RLOO: leave-one-out baseline, KL to the SFT policy in the reward"),
    "pipeline": ("align.pipeline", "PipelineConfig", "Run SFT -> reward -> PPO (the quickstart) end to end"),
    "eval": ("align.evaluate", "EvalConfig", "Compare two policies on held-out prompts"),
}
# commands with their own argument parsers (module.main(argv)), not stages
TOOLS = {"export": ("align.export", "Export a run's policy, SFT or reward role (hf merged, peft, gguf)"),
         "generate": ("align.generate", "Sample answers from a run's policy (or an exported model)")}


def _available(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="align", description="RLHF where every trainable part is a parameter-efficient module "
                                  "over one frozen, shared backbone.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _, helptext) in STAGES.items():
        if _available(module):
            p = sub.add_parser(name, help=helptext, description=helptext)
            p.add_argument("config", nargs="?", help="YAML config (optional: defaults + overrides)")
            p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 resume=true")
    cp = sub.add_parser("config", help="Print a stage's full config with every default (the config reference)")
    cp.add_argument("stage", choices=[n for n, (m, _, _) in STAGES.items() if _available(m)])
    cp.add_argument("--markdown", action="store_true", help="a table of every key, default and meaning")
    if _available("data_tools.cli"):
        sub.add_parser("import", help="Import human annotations into canonical records", add_help=False)
    for name, (module, helptext) in TOOLS.items():
        if _available(module):
            sub.add_parser(name, help=helptext, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "import":
        from data_tools.cli import main as import_main
        return import_main(argv[1:])
    if argv[0] in TOOLS and _available(TOOLS[argv[0]][0]):
        import importlib
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config":
        import importlib

        from omegaconf import OmegaConf
        module, cls_name, _ = STAGES[args.stage]
        if args.markdown:
            from align.config import reference_markdown
            print(reference_markdown(getattr(importlib.import_module(module), cls_name)), end="")
            return 0
        print(OmegaConf.to_yaml(OmegaConf.structured(getattr(importlib.import_module(module), cls_name))), end="")
        return 0
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    import importlib

    from align.config import ConfigError, load_config
    module, cls_name, _ = STAGES[args.command]
    mod = importlib.import_module(module)
    from align.distributed import end_processes, exit_now
    try:
        cfg = load_config(getattr(mod, cls_name), config, overrides)
        mod.run(cfg)
        if end_processes():
            exit_now(0)
    except ConfigError as e:
        print(f"align {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:   # a missing file, a full disk, bad data: one line, not a traceback
        print(f"align {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
