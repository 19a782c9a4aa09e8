"""The model card (README.md) every ``align export`` writes: base model and fingerprint, method,
the stages and their data, the run's key metrics, and how to load the export."""
from __future__ import annotations

import json

_SKIP = ("memory", "truncation", "stage")


def _metrics(summary: dict) -> list[tuple[str, str]]:
    rows = []
    for k in sorted(summary):
        v = summary[k]
        if k in _SKIP or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            rows.append((k, f"{v:.4g}" if isinstance(v, float) else str(v)))
    return rows[:40]


def _loading(fmt: str, role_is_reward: bool, files: list[str], backbone: str, revision: str | None = None) -> str:
    if fmt == "peft":
        at = f", revision={revision!r}" if revision else ""
        return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                f"base = AutoModelForCausalLM.from_pretrained({backbone!r}{at})\n"
                "model = PeftModel.from_pretrained(base, 'THIS_DIR')\n```\n"
                "The base must be the exact checkpoint above (its fingerprint is in the adapter's "
                "safetensors metadata).\n")
    if fmt == "gguf":
        gguf = next(f for f in files if f.endswith(".gguf"))
        return (f"llama.cpp: `llama-cli -m {gguf}` (the chat template and stop tokens are in the file).\n\n"
                "transformers (de-quantizes to float):\n\n```python\nfrom transformers import "
                "AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained('THIS_DIR', gguf_file={gguf!r})\n"
                f"tok = AutoTokenizer.from_pretrained('THIS_DIR', gguf_file={gguf!r})\n```\n")
    if role_is_reward:
        return ("```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                "model = AutoModelForSequenceClassification.from_pretrained('THIS_DIR')\n"
                "tok = AutoTokenizer.from_pretrained('THIS_DIR')   # pads on the right\n"
                "score = model(**tok(texts, return_tensors='pt', padding=True)).logits[:, 0]\n"
                "score += model.config.align_score_offset   # align's raw reward\n```\n"
                "A text is scored at its last token, which should be the stop token a response ends with.\n")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained('THIS_DIR')\n"
            "tok = AutoTokenizer.from_pretrained('THIS_DIR')\n"
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True,\n"
            "                              return_tensors='pt')   # when the tokenizer has a chat template\n"
            "out = model.generate(ids, max_new_tokens=64)   # stops at generation_config.eos_token_id\n```\n")


def model_card(info, role: str, fmt: str, dtype: str | None, methods: list[str], files: list[str]) -> str:
    spec = info.roles[role]
    repo_id, revision = info.backbone.get("repo_id"), info.backbone.get("revision")
    backbone = repo_id or info.backbone.get("path", "?")
    kind = {"hf": "Hugging Face checkpoint, adapters merged into the weights", "peft": "HF peft adapter",
            "gguf": f"llama.cpp GGUF ({dtype or 'f32'})"}[fmt]
    if fmt == "hf" and spec.head is not None:
        kind = "Hugging Face sequence-classification checkpoint (reward model, one label), adapters merged"
    # a Hub base model: the metadata the Hub reads (base model, library) for a pushed export
    front = ["---", f"base_model: {repo_id}", f"library_name: {({'hf': 'transformers'}).get(fmt, fmt)}",
             "tags:", "- align", "---", ""] if repo_id else []
    lines = front + [f"# {info.path.name}: {role} ({fmt})", "",
             f"Exported by `align export` from the run `{info.path}` (role `{role}`) as a {kind}.", "",
             "| | |", "|---|---|",
             f"| base model | `{backbone}`" + (f" (Hugging Face Hub, revision `{revision}`)" if repo_id else "") + " |",
             f"| base fingerprint | `{info.backbone.get('fingerprint', 'unknown')}` |",
             f"| method | {' + '.join(methods)} (adapter stack: {', '.join(n for n, _ in spec.adapters)}) |",
             f"| stage | {info.stage} |",
             f"| files | {', '.join(sorted(files))} |", "", "## Stages and data", ""]
    for st in info.lineage:
        data = ", ".join(f"{k}=`{v}`" for k, v in st["data"].items()) or "no data files recorded"
        lines.append(f"- **{st['stage']}** (`{st['run']}`): {data}")
    metrics = _metrics(info.summary)
    lines += ["", "## Metrics (summary.json)", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics]
    else:
        lines.append("The run's summary records no numeric metrics.")
    if spec.normalisation:
        lines += ["", f"Reward normalisation used in training: `{json.dumps(spec.normalisation)}`."]
    lines += ["", "## Loading", "", _loading(fmt, spec.head is not None, files, backbone, revision)]
    return "\n".join(lines)
