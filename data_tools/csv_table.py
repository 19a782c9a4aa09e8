"""Generic CSV/TSV with a column mapping (source name ``csv``; ``python -m data_tools.csv_table``).

The header row names the columns; ``--map`` works as for ``jsonl`` (data_tools/jsonl.py), e.g.
``--map prompt=question,chosen=good,rejected=bad`` or ``--map prompt=q,completions=a+b+c,scores=sa+sb+sc``.
Cells are strings: ``ranks``/``scores``/``margin``/``weight``/``agreement`` are parsed as numbers
(an empty optional cell means absent); content cells are taken verbatim, so conversational
(message-list) records need the JSONL importer. The delimiter is ``,`` (``\\t`` for ``*.tsv``;
``--delimiter``). Errors name the line where the row starts. A UTF-8 byte-order mark is ignored.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from data_tools.base import Item
from data_tools.canonical import RecordError
from data_tools.jsonl import JSONL, map_record, parse_map


class CSVTable(JSONL):
    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--delimiter", help="cell delimiter (default , or tab for .tsv)")

    def read(self, path: Path, opts):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            text = f.read()
        name = path.name[:-3] if path.suffix == ".gz" else path.name
        delimiter = getattr(opts, "delimiter", None) or ("\t" if name.endswith(".tsv") else ",")
        delimiter = "\t" if delimiter == "\\t" else delimiter
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        if len(set(header)) != len(header):
            raise RecordError(f"{path}: line 1", None, f"the header repeats column names: {header}")
        line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Item(path, line, "line", RecordError(f"{path}: line {line}", None, f"malformed CSV ({e})"))
                return
            start, line = line, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                yield Item(path, start, "line", RecordError(f"{path}: line {start}", None,
                                                            f"{len(row)} cells for {len(header)} columns"))
                continue
            yield Item(path, start, "line", dict(zip(header, row)))

    def convert(self, item, opts, state):
        mapping = state.setdefault("map", parse_map(opts.map))
        return [map_record(item.raw, mapping, item.where, self.name, text_cells=True)]


SOURCE = CSVTable("csv", "Generic CSV/TSV rows with --map canonical=column,...")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
