"""``align export`` and ``align generate``: every format is loaded back by a real client
(transformers, transformers' GGUF reader, peft) and compared with align's own model with the
adapters attached; every refusal happens before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.adapters import AdapterConfig
from align.adapters.peft_format import save_adapter, save_head
from align.export import ExportError, export
from tests.conftest import load

ROOT = Path(__file__).resolve().parents[1]
ALL_LINEAR = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TEXTS = ["the happy dog sings a good song", "sad clouds bring bad rain", "a movie"]


def perturb(aset, seed=0, scale=0.1):
    """Move every tensor of a set away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_run(root: Path, backbone, sets: dict, *, role="policy", head=False, stage=None, seed=0):
    """A finished run directory as the stages write it (adapters/<set>, backbone.json, config.yaml,
    summary.json, and reward_role.json / policy_role.json for stacks), from randomised sets; returns
    (run dir, the AlignModel with the role, its tokenizer)."""
    model, tok = load(backbone)
    run = root / (stage or role)
    names = []
    for i, (name, cfg) in enumerate(sets.items()):
        model.add_adapter(name, cfg)
        perturb(model.adapters[name], seed + i)
        save_adapter(model, name, run / "adapters" / name, backbone_name=str(backbone))
        names.append(name)
    entries = [{"name": n, "dir": f"adapters/{n}"} for n in names]
    if head:
        model.add_head("rm")
        with torch.no_grad():
            model.heads["rm"].linear.bias.fill_(0.37)
        save_head(model, "rm", run / "heads" / "reward")
        (run / "reward_role.json").write_text(json.dumps(
            {"adapters": entries, "head": "heads/reward", "normalisation": {"mean": 0.5, "std": 2.0}}))
    elif len(names) > 1 or names[0] != role:
        (run / f"{role}_role.json").write_text(json.dumps({"adapters": entries}))
    model.add_role(role, names, head="rm" if head else None)
    (run / "backbone.json").write_text(json.dumps({"path": str(backbone), "fingerprint": model.fingerprint,
                                                   "dtype": "float32", "quantization": "none"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": "/data/train.jsonl"}}))
    (run / "summary.json").write_text(json.dumps({"stage": stage or {"policy": "ppo"}.get(role, role),
                                                  "eval/loss": 1.25, "steps": 10}))
    model.eval()
    return run, model, tok


def ids_of(tok):
    return tok(TEXTS[:1], return_tensors="pt").input_ids


def align_logits(model, role, ids, n_vocab=None):
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), role=role).logits
    return out[..., :n_vocab] if n_vocab else out


def hf_logits(path, ids, **kw):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, m


def greedy_align(model, tok, role, ids, n):
    from align.scoring import generate
    resp = generate(model, [ids[0].tolist()], tok, "cpu", role=role, max_new_tokens=n, greedy=True)
    return resp.response[0][resp.response_mask[0]].tolist()


HF_CASES = {
    "lora": {"policy": AdapterConfig(method="lora", r=4, alpha=8, target_modules=ALL_LINEAR)},
    "rslora": {"policy": AdapterConfig(method="lora", r=4, alpha=8, use_rslora=True)},
    "ia3": {"policy": AdapterConfig(method="ia3")},
    "lora_then_ia3": {"sft": AdapterConfig(method="lora", r=2, alpha=4, target_modules=ALL_LINEAR),
                      "policy": AdapterConfig(method="ia3")},
    "top_k": {"policy": AdapterConfig(method="top_k", top_k=1)},
    "full": {"policy": AdapterConfig(method="full")},
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_export_matches_align_logits_and_greedy_tokens(tiny_llama, tmp_path, case):
    run, model, tok = make_run(tmp_path, tiny_llama, HF_CASES[case])
    out = export(run, tmp_path / "hf")
    ids = ids_of(tok)
    theirs, hf = hf_logits(out, ids)
    ours = align_logits(model, "policy", ids)
    assert (theirs - ours).abs().max() <= 1e-4
    n = 12
    want = greedy_align(model, tok, "policy", ids, n)
    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    assert got.tolist()[:len(want)] == want
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.eos_token_id in gen["eos_token_id"]
    card = (out / "README.md").read_text()
    assert model.fingerprint in card and "/data/train.jsonl" in card and "eval/loss" in card
