"""Stanford Alpaca ``alpaca_data.json`` (a JSON array; also JSONL/Parquet): instruction, input, output.

Default: ``{"messages": [user, assistant]}`` where the user turn is the instruction, followed by
``"\\n\\n"`` and the input when the input is not empty, and the assistant turn the output, all
verbatim. ``--template alpaca`` writes ``{"prompt", "completion"}`` strings with Alpaca's own
training prompt (``PROMPT_DICT`` of train.py, with or without the input block) instead. Other
fields stay in ``meta``.
"""
from __future__ import annotations

from data_tools.base import Source, get, msg, require_object, without

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def instruction_record(instruction: str, context: str, output: str, template: str | None, meta: dict) -> dict:
    if template == "alpaca":
        p = PROMPT_INPUT if context else PROMPT_NO_INPUT
        return {"prompt": p.format(instruction=instruction, input=context), "completion": output, "meta": meta}
    user = f"{instruction}\n\n{context}" if context else instruction
    return {"messages": [msg("user", user), msg("assistant", output)], "meta": meta}


class Alpaca(Source):
    fields = ("instruction", "input", "output")

    def add_arguments(self, parser):
        parser.add_argument("--template", choices=("chat", "alpaca"), default="chat",
                            help="chat (default): user/assistant messages; alpaca: Alpaca's prompt template as "
                                 "prompt/completion strings")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        instruction = get(raw, self.fields[0], item.where)
        context = get(raw, self.fields[1], item.where, default="")
        output = get(raw, self.fields[2], item.where)
        return [instruction_record(instruction, context, output, opts.template, without(raw, *self.fields))]


SOURCE = Alpaca("alpaca", "Stanford Alpaca instruction/input/output demonstrations (SFT)")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
