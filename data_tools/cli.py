"""``align import SOURCE INPUT... --out OUTPUT`` (also ``python -m data_tools``)."""
from __future__ import annotations

import argparse
import importlib
import sys

from data_tools.canonical import RecordError

# source name -> module holding SOURCE
SOURCES = {
    "label-studio": "data_tools.label_studio",
}


def available() -> dict:
    out = {}
    for name, mod in SOURCES.items():
        try:
            out[name] = importlib.import_module(mod).SOURCE
        except ModuleNotFoundError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    from data_tools.base import run
    sources = available()
    parser = argparse.ArgumentParser(prog="align import", description="Import annotations into canonical records.")
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name, src in sources.items():
        p = sub.add_parser(name, help=src.help, description=src.help)
        p.add_argument("inputs", nargs="+", metavar="INPUT")
        p.add_argument("--out", required=True, help="output file (.jsonl or .parquet), or a directory with --split")
        p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="fail: stop before writing anything; skip: write OUTPUT.rejects.jsonl with reasons")
        p.add_argument("--split", help="e.g. train=0.9,validation=0.05,test=0.05 (by prompt hash)")
        p.add_argument("--aggregate", choices=("mean", "majority"), default="mean",
                       help="how several annotators' judgements of one item are combined")
        src.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        run(sources[args.source], args.inputs, args.out, args, on_error=args.on_error, split=args.split)
    except (RecordError, FileNotFoundError, ValueError) as e:
        print(f"align import {args.source}: error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            print("nothing was written (use --on-error skip to write the valid records and a rejects file)",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
