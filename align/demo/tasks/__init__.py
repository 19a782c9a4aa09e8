"""Pipeline tasks: prompts, demonstrations and a hidden gold scorer (see align/demo/pipeline.py).

A pipeline config names one by its module here (``task: quickstart``, ``task: short_answers``) or
by a full module path (``task: mypackage.mytask``: a task of your own)."""
from __future__ import annotations

import importlib.util


def task_module_name(task: str) -> str:
    """The module a ``task`` setting names: a bundled task by its bare name (``quickstart`` ->
    ``align.demo.tasks.quickstart``), anything else as given (a module path of your own)."""
    if task and "." not in task and importlib.util.find_spec(f"{__name__}.{task}") is not None:
        return f"{__name__}.{task}"
    return task
