"""Records that know where they were read from, so later errors name the file and line."""
from __future__ import annotations


class Record(dict):
    """A record as read from a file, knowing where it came from (``where``: "FILE: line N" for
    JSONL, "FILE: record N" for the N-th element of a JSON array or row of a table), so an error
    found later (after a split by prompt) still names the line a user can open."""
    __slots__ = ("where",)

    def __init__(self, data=(), where: str = ""):
        super().__init__(data)
        self.where = where


def where_of(record, fallback: str) -> str:
    """The record's location when it was read from a file, else ``fallback``."""
    return getattr(record, "where", "") or fallback
