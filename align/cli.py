"""``align`` command line: one sub-command per stage plus the pipeline, import, eval and config."""
from __future__ import annotations

import argparse
import sys

from align.registry import STAGES, TOOLS, module_available


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="align", description="RLHF where every trainable part is a parameter-efficient module "
                                  "over one frozen, shared backbone.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, stage in STAGES.items():
        if stage.available():
            p = sub.add_parser(name, help=stage.help, description=stage.help)
            p.add_argument("config", nargs="?", help="YAML config (optional: defaults + overrides)")
            p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 resume=true")
    cp = sub.add_parser("config", help="Print a stage's full config with every default (the config reference)")
    cp.add_argument("stage", choices=[n for n, s in STAGES.items() if s.available()])
    cp.add_argument("--markdown", action="store_true", help="a table of every key, default and meaning")
    if module_available("data_tools.cli"):
        sub.add_parser("import", help="Import human annotations into canonical records", add_help=False)
    for name, (module, helptext) in TOOLS.items():
        if module_available(module):
            sub.add_parser(name, help=helptext, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "import":
        from data_tools.cli import main as import_main
        return import_main(argv[1:])
    if argv[0] in TOOLS and module_available(TOOLS[argv[0]][0]):
        import importlib
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config":
        from omegaconf import OmegaConf
        cls = STAGES[args.stage].config
        if args.markdown:
            from align.config import reference_markdown
            print(reference_markdown(cls), end="")
            return 0
        print(OmegaConf.to_yaml(OmegaConf.structured(cls)), end="")
        return 0
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    from align.config import ConfigError, load_config
    from align.distributed import end_processes
    stage = STAGES[args.command]
    try:
        cfg = load_config(stage.config, config, overrides)
        stage.run(cfg)
        if end_processes():
            _closed_group.append(args.command)
    except ConfigError as e:
        print(f"align {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:   # a missing file, a full disk, bad data: one line, not a traceback
        print(f"align {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


_closed_group: list[str] = []   # the command that closed a process group at its end (see entry)


def entry() -> None:
    """The ``align`` program (and ``python -m align.cli``): ``main``, then the exit. A process that
    closed a multi-process group at the end of its command leaves with ``exit_now`` (gloo's native
    threads otherwise abort it now and then at interpreter exit: align.distributed.end_processes);
    ``main`` itself never ends the interpreter, so calling it in-process is safe."""
    code = main()
    if _closed_group:
        from align.distributed import exit_now
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
