"""Rules for config values, declared next to the fields they govern.

A config dataclass declares each field with :func:`setting`: its default, its help text (the
config reference, ``align config STAGE --markdown``, is generated from it) and its rule (and the
class may add a ``checks(at)`` method for what spans fields or touches the disk); an adapter
method declares the ``AdapterConfig`` fields it reads as ``settings = {field: rule}``. ``align.config.validate`` walks
a stage config and applies them all before any stage writes anything.

This module imports nothing from ``align``: configs and adapter methods both declare with it.
A rule's :meth:`problem` returns what is wrong with a value (``None`` if nothing); the caller
prefixes it with ``key=value: ``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path


class ConfigError(ValueError):
    """A config (or a run directory it names) that a stage refuses before writing anything."""


def setting(default=dataclasses.MISSING, help: str = "", rule: "Rule | None" = None, *, factory=None):
    """A config field: ``default`` (or ``factory`` for a mutable one), the ``help`` the reference
    shows for it, and the ``rule`` its value must follow (``None``: any value of its type)."""
    meta = {"help": help, "rule": rule}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_rule(f: dataclasses.Field) -> "Rule | None":
    return f.metadata.get("rule")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def keyword_parameters(fn, after: int) -> tuple[list[str], list[str], bool] | None:
    """The parameters of ``fn`` after its first ``after`` (a scorer's data columns): the names it
    accepts by keyword, those among them without a default, and whether it takes ``**kwargs``;
    None for a builtin without a signature."""
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p for p in params[after:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind is p.VAR_KEYWORD for p in params))


class Rule:
    def problem(self, value) -> str | None:
        raise NotImplementedError


class OneOf(Rule):
    """A choice among fixed strings (``null=True``: None too)."""

    def __init__(self, *choices: str, null: bool = False):
        self.choices, self.null = tuple(choices), null

    def problem(self, value) -> str | None:
        if value is None and self.null:
            return None
        if isinstance(value, str) and value in self.choices:
            return None
        return "choose one of " + ", ".join(self.choices) + (" (or null)" if self.null else "")


class Range(Rule):
    """A number in [lo, hi] (``lo_open``/``hi_open``: the bound excluded; None: unbounded)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def text(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else str(x)
        if self.lo is not None and self.hi is not None:
            return f"must be in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"must be {'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"must be {'<' if self.hi_open else '<='} {num(self.hi)}"

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a{'n integer' if self.integer else ' number'}"
        if self.integer and not float(value).is_integer():
            return "must be an integer"
        if not math.isfinite(value):
            return "must be a finite number"
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return self.text() if lo_bad or hi_bad else None


POSITIVE = Range(0, lo_open=True)                # > 0
NON_NEGATIVE = Range(0)                          # >= 0 (0 usually means "off" / "at the end only")
AT_LEAST_ONE = Range(1, integer=True)            # >= 1
FRACTION = Range(0, 1, hi_open=True)             # a share held out: [0, 1)
UNIT = Range(0, 1)                               # a probability / discount: [0, 1]


class Exists(Rule):
    """A path on disk: ``required`` (else '' means unset); ``kind="dir"``: a directory (records
    files may be directories too: a saved ``datasets`` dataset)."""

    def __init__(self, required: bool = False, kind: str = "any", what: str = ""):
        self.required, self.kind, self.what = required, kind, what

    def problem(self, value) -> str | None:
        if value in ("", None):
            return f"required{': ' + self.what if self.what else ''}" if self.required else None
        p = Path(str(value))
        if not p.exists():
            return "no such file or directory"
        if self.kind == "dir" and not p.is_dir():
            return "is not a directory"
        return None


class Spec(Rule):
    """A ``module:function`` reference ('' allowed unless ``required``): the module imports, the
    function exists and, with ``args``, can be called with that many positional arguments (with
    ``columns``: plus, by name, whatever further parameters it requires -- data columns a scorer
    receives as keyword arguments, align.scoring.call_scorer)."""

    FORM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    def __init__(self, required: bool = False, args: int = 0, call: str = "", columns: bool = False,
                 names=None):
        self.required, self.args, self.call, self.columns = required, args, call, columns
        self.names = names   # a bare name -> 'module:function' (built-in verifiers), or None

    def problem(self, value) -> str | None:
        if value in ("", None):
            return "required" if self.required else None
        if self.names is not None:
            value = self.names(value)
        if not isinstance(value, str) or not self.FORM.match(value):
            return "give 'module:function'"
        import importlib
        import importlib.util
        import inspect
        mod, _, name = value.partition(":")
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"module {mod!r} cannot be imported"
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say how
            return f"importing {mod!r} failed: {type(e).__name__}: {e}"
        if not callable(fn):
            return f"{mod!r} has no function {name!r}"
        if self.args:
            try:
                required = (keyword_parameters(fn, self.args) or ([], [], False))[1] if self.columns else []
                inspect.signature(fn).bind(*range(self.args), **dict.fromkeys(required))
            except TypeError as e:
                return f"cannot be called as {self.call or f'{self.args} positional arguments'} ({e})"
            except ValueError:
                pass  # a builtin without a signature: let the call tell
        return None


__all__ = ["Rule", "OneOf", "Range", "Exists", "Spec", "POSITIVE", "NON_NEGATIVE", "AT_LEAST_ONE",
           "FRACTION", "UNIT"]
