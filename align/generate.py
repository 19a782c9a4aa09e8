"""``align generate RUN_DIR``: answers from a run's policy (or from a directory ``align export``
wrote), with the chat template and stop tokens it was trained with (docs/export.md).

Prompts come from ``--prompt TEXT`` (repeatable), ``--prompts FILE`` (records with a ``prompt``, as
the stages read them, or a ``.txt`` file with one prompt per line), or, when standard input is a
terminal, an interactive loop (an empty line or end of input ends it). A plain-text prompt becomes
a user turn of the chat template when the tokenizer (or the run's ``data.chat_template``) has one;
``--raw`` sends it as it is. ``--compare`` answers each prompt with the SFT policy and the run's
policy, sampled with the same seed. Sampling goes through ``align.scoring.generate``, the sampler
every stage uses: ``--temperature`` (0 = greedy), ``--top-p`` (nucleus), ``--max-new-tokens``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory, or a directory align export --format hf wrote")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="a records file (JSONL/JSON/Parquet with 'prompt') or a .txt, one per line")
    p.add_argument("--role", choices=("policy", "sft"), help="default: the run's policy, else its SFT policy")
    p.add_argument("--compare", action="store_true", help="answer with the SFT policy and the policy side by side")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _check_args(args) -> None:
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")


def load_target(args, device: str):
    """(tokenizer, model, {label: role}, chat template) for a run directory or an exported one."""
    from align.export import is_run_dir, load_roles, read_run
    target = Path(args.run_dir)
    if (target / "config.json").is_file() and not is_run_dir(target):
        if args.compare or args.role:
            raise ValueError(f"{target} is an exported model (one policy): --compare and --role need a run directory")
        from align.config import ModelConfig
        from align.stages.common import load_model
        tok, model = load_model(str(target), ModelConfig(path=str(target), dtype=args.dtype), device)
        model.eval()
        return tok, model, {"model": "base"}, None
    info = read_run(target)
    policies = [r for r in ("policy", "sft") if r in info.roles]
    if not policies:
        raise ValueError(f"{target}: no policy to sample from (its roles: {', '.join(info.roles)}); "
                         f"a reward run scores text, it does not write it")
    role = args.role or policies[0]
    if role not in info.roles:
        raise ValueError(f"--role {role}: {target} has the roles {', '.join(info.roles)}")
    roles = [role]
    if args.compare:
        if role == "sft" or "sft" not in info.roles:
            raise ValueError(f"--compare: {target} needs a policy and the SFT run it started from "
                             f"(config.yaml sft_run); its roles: {', '.join(info.roles)}")
        roles = ["sft", role]
    tok, model = load_roles(info, roles, device, args.dtype)
    return tok, model, {r: r for r in roles}, info.chat_template


def read_prompts(args) -> list:
    """The prompts of --prompt and --prompts (strings, or message lists from records)."""
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file() and not path.is_dir():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        if path.suffix == ".txt":
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
        else:
            from align.data.common import read_records
            from align.data.sft import prompt_of
            for i, r in enumerate(read_records(path), 1):
                try:
                    prompts.append(prompt_of(r)[0])    # 'prompt', or a 'messages' conversation
                except ValueError as e:
                    raise ValueError(f"{path}: record {i}: {e}") from None
    return prompts


def encode_prompt(prompt, tok, chat_template: str | None, raw: bool) -> tuple[str, list[int]]:
    from align.data.sft import prompt_text
    from align.tokens import encode
    if isinstance(prompt, str) and not raw and (chat_template or getattr(tok, "chat_template", None)):
        prompt = [{"role": "user", "content": prompt}]
    text = prompt_text(prompt, tok, chat_template)
    return text, encode(tok, text, bos=True)


@torch.no_grad()
def answer(model, tok, roles: dict, prompts: list, args, chat_template, device) -> list[dict]:
    """One record per prompt: its text and each role's response and whether it stopped."""
    from align.scoring import decode, generate
    encoded = [encode_prompt(p, tok, chat_template, args.raw) for p in prompts]
    out = [{"prompt": p if isinstance(p, str) else text, "responses": {}, "ended": {}}
           for p, (text, _) in zip(prompts, encoded)]
    for label, role in roles.items():
        gen = torch.Generator(device=device).manual_seed(args.seed)
        resp = generate(model, [ids for _, ids in encoded], tok, device, role=role,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature or 1.0,
                        greedy=args.temperature == 0, generator=gen, top_p=args.top_p)
        for rec, text, ended in zip(out, decode(tok, resp), resp.has_stop.tolist()):
            rec["responses"][label] = text
            rec["ended"][label] = ended
    return out


def show(records: list[dict], as_json: bool, many: bool) -> None:
    for rec in records:
        if as_json:
            print(json.dumps(rec, ensure_ascii=False))
            continue
        if many or len(records) > 1:
            print(f"### {rec['prompt']}")
        for label, text in rec["responses"].items():
            if many:
                print(f"--- {label}{'' if rec['ended'][label] else ' (no stop token: cut at --max-new-tokens)'}")
            print(text)
        if many or len(records) > 1:
            print()
    sys.stdout.flush()


def interactive(model, tok, roles, args, chat_template, device) -> None:
    while True:
        sys.stderr.write("> ")   # the prompt marker on stderr: stdout holds only answers (--json stays JSON)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():     # end of input or an empty line
            break
        line = line.rstrip("\n")
        show(answer(model, tok, roles, [line], args, chat_template, device), args.json, len(roles) > 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="align generate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        _check_args(args)
        prompts = read_prompts(args)
        if not prompts and not sys.stdin.isatty():
            raise ValueError("no prompts: give --prompt TEXT or --prompts FILE (or run it in a terminal)")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok, model, roles, chat_template = load_target(args, device)
        if prompts:
            show(answer(model, tok, roles, prompts, args, chat_template, device), args.json, len(roles) > 1)
        else:
            interactive(model, tok, roles, args, chat_template, device)
    except (OSError, ValueError) as e:
        print(f"align generate: error: {e}", file=sys.stderr)
        return 1
    return 0
