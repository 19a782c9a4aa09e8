"""``align import SOURCE INPUT... --out OUTPUT`` (also ``python -m data_tools SOURCE ...`` and
``python -m data_tools.<module> INPUT...``). See data_tools/README.md.

This is the top of data_tools' import graph: it imports :mod:`data_tools.base` and
:mod:`data_tools.importer`, and nothing below it imports this module. The source modules are
looked up by name in :data:`SOURCES` (``importlib``, a registry rather than an import), and a
source module run as a script imports :func:`module_main` only inside its ``__main__`` block.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from data_tools.base import UsageError
from data_tools.canonical import RecordError
from data_tools.importer import run

# source name -> module holding SOURCE (python -m data_tools.<module> runs that source)
SOURCES = {
    "hh-rlhf": "data_tools.hh_rlhf",
    "summarize-from-feedback": "data_tools.summarize_from_feedback",
    "shp": "data_tools.shp",
    "ultrafeedback": "data_tools.ultrafeedback",
    "ultrafeedback-binarized": "data_tools.ultrafeedback_binarized",
    "oasst": "data_tools.oasst",
    "helpsteer2": "data_tools.helpsteer2",
    "label-studio": "data_tools.label_studio",
    "argilla": "data_tools.argilla",
    "alpaca": "data_tools.alpaca",
    "dolly": "data_tools.dolly",
    "sharegpt": "data_tools.sharegpt",
    "jsonl": "data_tools.jsonl",
    "csv": "data_tools.csv_table",
}


def source(name: str):
    return importlib.import_module(SOURCES[name]).SOURCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align import", description="Import annotation data into canonical records (data_tools/README.md).")
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name in SOURCES:
        src = source(name)
        p = sub.add_parser(name, help=src.help, description=src.help)
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (JSON, JSONL, .gz, Parquet) "
                                                                  "or datasets.save_to_disk directories")
        p.add_argument("--out", required=True, metavar="OUTPUT",
                       help="output: *.jsonl (also *.jsonl.gz), *.parquet, or a path without suffix for a "
                            "datasets.save_to_disk directory; with --split a directory of one file per split")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUTPUT: a file, or a directory an earlier align import wrote "
                            "(a directory holding anything else is never replaced)")
        p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="fail (default): stop at the first bad record, write nothing; skip: write the good "
                            "records and OUTPUT.rejects.jsonl (each reject with file, record number, reason)")
        p.add_argument("--split", metavar="NAME=FRAC,...",
                       help="e.g. train=0.9,validation=0.05,test=0.05: deterministic by prompt hash")
        p.add_argument("--format", choices=("jsonl", "parquet", "datasets"),
                       help="output format (default: from OUTPUT's suffix; jsonl with --split)")
        p.add_argument("--aggregate", choices=("mean", "majority"), default="mean",
                       help="how several judgements of one item combine (default mean)")
        p.add_argument("--empty-completions", choices=("reject", "keep"), default=None,
                       help=f"a record with an empty completion is rejected or kept (default: "
                            f"{src.empty_completions} for {name})")
        src.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:           # --help (0) or a usage error (2, message already on stderr)
        return int(e.code or 0)
    try:
        run(source(args.source), args.inputs, args.out, args, on_error=args.on_error, split=args.split,
            fmt=args.format, overwrite=args.overwrite)
    except UsageError as e:
        print(f"align import {args.source}: error: {e}", file=sys.stderr)
        return 2
    except (RecordError, OSError, ValueError) as e:
        print(f"align import {args.source}: error: {e}", file=sys.stderr)
        if isinstance(e, RecordError):
            print("nothing was written (--on-error skip writes the good records and a rejects file)",
                  file=sys.stderr)
        return 1
    return 0


def module_main(source_name: str) -> None:
    """``python -m data_tools.<module> INPUT... --out OUTPUT``: :func:`main` with the source named."""
    sys.exit(main([source_name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
