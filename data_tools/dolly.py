"""Databricks Dolly 15k (``databricks-dolly-15k.jsonl``): instruction, context, response, category.

Mapped like Alpaca (context in the role of Alpaca's input; ``--template alpaca`` available);
``category`` and other fields stay in ``meta``. ``context`` is kept verbatim, including the
Wikipedia citation markers (``[3]``) some copies have.
"""
from __future__ import annotations

from data_tools.alpaca import Alpaca


class Dolly(Alpaca):
    fields = ("instruction", "context", "response")


SOURCE = Dolly("dolly", "Databricks Dolly 15k instruction/context/response demonstrations (SFT)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
