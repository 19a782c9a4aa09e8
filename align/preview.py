"""``align preview``: what an SFT config trains, before a run. Renders the first records of
``data.train`` exactly as ``align sft`` tokenizes them (chat template, every assistant turn or the
last one, truncation) and prints each example with the tokens that carry the loss between ⟦ and ⟧.

    align preview configs/sft.yaml data.train=my_chats.jsonl --n 2
"""
from __future__ import annotations

import argparse
import sys

LEFT, RIGHT = "⟦", "⟧"


def marked(tok, input_ids: list[int], labels: list[int], ignore: int) -> str:
    """The example's text with each run of trained tokens between ⟦ and ⟧ (special tokens kept)."""
    out, run, trained = [], [], None
    for t, lab in zip(input_ids, labels):
        is_trained = lab != ignore
        if trained is not None and is_trained != trained:
            text = tok.decode(run)
            out.append(f"{LEFT}{text}{RIGHT}" if trained else text)
            run = []
        run.append(t)
        trained = is_trained
    if run:
        text = tok.decode(run)
        out.append(f"{LEFT}{text}{RIGHT}" if trained else text)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="align preview", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="an SFT config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=chats.jsonl")
    p.add_argument("--n", type=int, default=3, help="how many records to show (default 3)")
    args = p.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    from align.backbone import load_tokenizer
    from align.config import ConfigError, load_config
    from align.data.common import read_records
    from align.data.sft import IGNORE, build_examples
    from align.stages.sft import SFTConfig
    try:
        cfg = load_config(SFTConfig, config, overrides)
        if not cfg.model.path or not cfg.data.train:
            raise ConfigError("give model.path and data.train")
        tok = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.data.chat_template)
        records = read_records(cfg.data.train, cfg.data.chat)[:max(args.n, 0)]
        examples, report = build_examples(records, tok, cfg.data.max_length, cfg.data.completion_only_loss,
                                          cfg.data.chat_template, where=cfg.data.train, turns=cfg.data.train_turns)
    except ConfigError as e:
        print(f"align preview: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"align preview: error: {e}", file=sys.stderr)
        return 1
    for i, ex in enumerate(examples, 1):
        n = sum(lab != IGNORE for lab in ex.labels)
        print(f"--- example {i}: {len(ex.input_ids)} tokens, {n} of them trained (between the marks) ---")
        print(marked(tok, ex.input_ids, ex.labels, IGNORE))
    print(f"--- {len(records)} records -> {len(examples)} examples; data.train_turns={cfg.data.train_turns}; "
          f"truncation: {report.as_dict()}")
    return 0
