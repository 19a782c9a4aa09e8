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
from align.rundir import RunDir
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
    summary.json, and the role's stack in roles.json), from randomised sets; returns
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
        RunDir(run).write_roles({"reward": {"adapters": entries, "head": "heads/reward",
                                            "normalisation": {"mean": 0.5, "std": 2.0}}})
    elif len(names) > 1 or names[0] != role:
        RunDir(run).write_roles({role: {"adapters": entries}})
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


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "qwen3", "gemma3_text"])
def test_hf_export_of_a_stack_on_other_families(tiny_paths, tmp_path, family):
    """gpt2's Conv1D layout ([in, out]) and fused q|k|v (IA3 scales its k and v thirds), qwen2's biases."""
    sets = {"sft": AdapterConfig(method="lora", r=2, alpha=4), "policy": AdapterConfig(method="ia3")}
    run, model, tok = make_run(tmp_path, tiny_paths[family], sets)
    out = export(run, tmp_path / "hf")
    ids = ids_of(tok)
    theirs, _ = hf_logits(out, ids)
    assert (theirs - align_logits(model, "policy", ids)).abs().max() <= 1e-4


GGUF_TOL = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2}   # measured on tiny llama: 4e-7, 3e-4, 9e-3


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_export_loads_in_transformers_with_matching_logits(tiny_llama, tmp_path, dtype):
    pytest.importorskip("gguf")
    run, model, tok = make_run(tmp_path, tiny_llama, HF_CASES["lora"])
    out = export(run, tmp_path / "gguf", fmt="gguf", dtype=dtype)
    name = f"policy-{dtype}.gguf"
    assert (out / name).is_file()
    ids = ids_of(tok)
    theirs, _ = hf_logits(out, ids, gguf_file=name)
    ours = align_logits(model, "policy", ids)
    diff = float((theirs - ours).abs().max())
    print(f"gguf {dtype}: max |dlogit| = {diff:.3g}")
    assert diff <= GGUF_TOL[dtype]
    from transformers import AutoTokenizer
    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    for text in TEXTS:   # the tokenizer rebuilt from the file's metadata splits text as the original
        assert gtok(text, add_special_tokens=True).input_ids == tok(text).input_ids
    assert gtok.eos_token_id == tok.eos_token_id and gtok.bos_token_id == tok.bos_token_id


def test_gguf_metadata_is_what_llama_cpp_reads(tiny_llama, tmp_path):
    gguf = pytest.importorskip("gguf")
    run, model, tok = make_run(tmp_path, tiny_llama, HF_CASES["ia3"])
    out = export(run, tmp_path / "gguf", fmt="gguf", dtype="q8_0")
    r = gguf.GGUFReader(out / "policy-q8_0.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")
         and k not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    cfg = model.backbone.config
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == cfg.num_hidden_layers
    assert f["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.0.attn_norm.weight"] == "F32"
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= set(names)


def test_gguf_refuses_other_architectures_before_writing(tiny_paths, tmp_path):
    run, _, _ = make_run(tmp_path, tiny_paths["qwen2"], HF_CASES["rslora"])
    with pytest.raises(ExportError, match=r"architecture is qwen2 .*Llama family"):
        export(run, tmp_path / "out", fmt="gguf")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix"])
def test_peft_export_loads_on_the_original_checkpoint_with_identical_logits(tiny_llama, tmp_path, method):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    cfgs = {"lora": HF_CASES["lora"]["policy"], "ia3": AdapterConfig(method="ia3"),
            "prefix": AdapterConfig(method="prefix", num_virtual_tokens=3)}
    run, model, tok = make_run(tmp_path, tiny_llama, {"policy": cfgs[method]})
    out = export(run, tmp_path / "peft", fmt="peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = ids_of(tok)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(theirs, align_logits(model, "policy", ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma3_text"])
def test_reward_export_scores_as_align_reward_role(tiny_paths, tmp_path, family):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.scoring import sequence_rewards
    targets = None if family == "gpt2" else ALL_LINEAR
    run, model, tok = make_run(tmp_path, tiny_paths[family], {"reward": AdapterConfig(
        method="lora", r=4, alpha=8, target_modules=targets)}, role="reward", head=True)
    out = export(run, tmp_path / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    rtok = AutoTokenizer.from_pretrained(str(out))
    batch = rtok([t + tok.eos_token for t in TEXTS], return_tensors="pt", padding=True)
    assert rtok.padding_side == "right" and rm.config.num_labels == 1
    assert rm.config.architectures == [type(rm).__name__]  # Gemma-3: the text model's class
    with torch.no_grad():
        theirs = rm(**batch).logits[:, 0] + rm.config.align_score_offset
        values = model(batch["input_ids"], batch["attention_mask"], role="reward").values
    ours = sequence_rewards(values, batch["attention_mask"])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert rm.config.align_reward_normalisation == {"mean": 0.5, "std": 2.0}


@pytest.mark.parametrize("method,fmt,match", [
    ("bottleneck", "hf", r"bottleneck, which adds a small nonlinear network.*no bottleneck method"),
    ("prefix", "hf", r"prefix, which adds learned key/value.*--format peft"),
    ("prompt", "gguf", r"prompt, which prepends.*--format peft"),
    ("ptuning", "hf", r"ptuning.*--format peft"),
    ("llama_adapter", "hf", r"llama_adapter.*--format peft"),
    ("bottleneck", "peft", r"HF peft has no bottleneck"),
    ("full", "peft", r"HF peft has no full method; use --format hf"),
])
def test_methods_a_format_cannot_carry_are_refused_before_writing(tiny_llama, tmp_path, method, fmt, match):
    run, _, _ = make_run(tmp_path, tiny_llama, {"policy": AdapterConfig(method=method)})
    with pytest.raises(ExportError, match=match):
        export(run, tmp_path / "out", fmt=fmt)
    assert not (tmp_path / "out").exists()


def test_bad_runs_and_outputs_are_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        export(tmp_path / "missing", tmp_path / "out")
    run, _, _ = make_run(tmp_path, tiny_llama, HF_CASES["rslora"])
    summary = (run / "summary.json").read_text()
    (run / "summary.json").unlink()
    with pytest.raises(ExportError, match="has not finished"):
        export(run, tmp_path / "out")
    (run / "summary.json").write_text(json.dumps({"stopped_at": "step 3"}))
    with pytest.raises(ExportError, match="stopped early"):
        export(run, tmp_path / "out")
    (run / "summary.json").write_text(summary)
    with pytest.raises(ExportError, match="--role reward: .* has the roles policy"):
        export(run, tmp_path / "out", role="reward")
    with pytest.raises(ExportError, match="--dtype q4: GGUF export writes f32, f16, q8_0"):
        export(run, tmp_path / "out", fmt="gguf", dtype="q4")
    with pytest.raises(ExportError, match="--dtype f16: a peft export holds the adapter's tensors"):
        export(run, tmp_path / "out", fmt="peft", dtype="f16")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="would overwrite"):
        export(run, run, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="did not write"):
        export(run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export(run, tmp_path / "out")
    with pytest.raises(ExportError, match="--overwrite"):
        export(run, tmp_path / "out")
    export(run, tmp_path / "out", fmt="peft", overwrite=True)   # an earlier export is replaced
    assert (tmp_path / "out" / "adapter_config.json").exists() and not (tmp_path / "out" / "config.json").exists()


def test_peft_refuses_a_stack_of_several_sets(tiny_llama, tmp_path):
    run, _, _ = make_run(tmp_path, tiny_llama, HF_CASES["lora_then_ia3"])
    with pytest.raises(ExportError, match="stacks 2 adapter sets .*use --format hf"):
        export(run, tmp_path / "out", fmt="peft")
    with pytest.raises(ExportError, match="sequence-classification"):
        run2, _, _ = make_run(tmp_path / "r", tiny_llama, {"reward": AdapterConfig(method="lora")},
                              role="reward", head=True)
        export(run2, tmp_path / "out", fmt="gguf")


# ------------------------------------------------------------------------------------ align generate
def run_generate(capsys, *argv):
    from align.generate import main
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_answers_as_align_samples_and_compares_sft_with_policy(tiny_llama, tmp_path, capsys):
    sft_run, sft_model, tok = make_run(tmp_path, tiny_llama, {"sft": HF_CASES["rslora"]["policy"]}, role="sft")
    run, model, _ = make_run(tmp_path, tiny_llama, HF_CASES["lora"], seed=5)
    (run / "config.yaml").write_text(yaml.safe_dump({"sft_run": str(sft_run), "data": {"prompts": "/p.jsonl"}}))
    rc, out, err = run_generate(capsys, run, "--prompt", TEXTS[0], "--prompt", TEXTS[1], "--temperature", 0,
                                "--max-new-tokens", 8, "--compare", "--json")
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in recs] == TEXTS[:2]
    for rec, text in zip(recs, TEXTS):
        ids = tok(text, return_tensors="pt").input_ids
        for role, m in (("sft", sft_model), ("policy", model)):
            assert rec["responses"][role] == tok.decode(greedy_align(m, tok, role, ids, 8), skip_special_tokens=True)
    assert recs[0]["responses"]["sft"] != recs[0]["responses"]["policy"]
    rc, out, _ = run_generate(capsys, run, "--prompt", TEXTS[0], "--temperature", 0, "--max-new-tokens", 8, "--compare")
    assert "--- sft" in out and "--- policy" in out
    # a card in the export names both stages and their data
    card = (export(run, tmp_path / "hf") / "README.md").read_text()
    assert "/data/train.jsonl" in card and "/p.jsonl" in card


def test_generate_on_an_exported_model_gives_the_runs_answers(tiny_llama, tmp_path, capsys):
    run, _, _ = make_run(tmp_path, tiny_llama, HF_CASES["ia3"])
    out_dir = export(run, tmp_path / "hf")
    args = ["--prompts", tmp_path / "p.txt", "--temperature", 0, "--max-new-tokens", 10, "--json"]
    (tmp_path / "p.txt").write_text("\n".join(TEXTS) + "\n")
    _, from_run, _ = run_generate(capsys, run, *args)
    rc, from_export, err = run_generate(capsys, out_dir, *args)
    assert rc == 0, err
    a = [json.loads(line)["responses"]["policy"] for line in from_run.splitlines()]
    b = [json.loads(line)["responses"]["model"] for line in from_export.splitlines()]
    assert a == b and len(a) == 3


def test_generate_sampling_options_and_refusals(tiny_llama, tmp_path, capsys):
    from align.generation import nucleus
    logp = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), -1)
    kept = nucleus(logp, 0.5).isfinite()
    for row, k in zip(logp, kept):   # the kept set: the most likely tokens, reaching 0.5 by a minimal set
        order = row.argsort(descending=True)
        n = int(k.sum())
        assert set(order[:n].tolist()) == set(k.nonzero().flatten().tolist())
        assert row[order[:n]].exp().sum() >= 0.5 > row[order[:n - 1]].exp().sum()
    run, _, _ = make_run(tmp_path, tiny_llama, HF_CASES["rslora"])
    base = [run, "--prompt", TEXTS[0], "--max-new-tokens", 6, "--json", "--seed", 3]
    rc, tiny_p, _ = run_generate(capsys, *base, "--top-p", 1e-6)
    _, greedy, _ = run_generate(capsys, *base, "--temperature", 0)
    assert rc == 0 and json.loads(tiny_p)["responses"] == json.loads(greedy)["responses"]
    _, s1, _ = run_generate(capsys, *base, "--temperature", 1.0)
    _, s2, _ = run_generate(capsys, *base, "--temperature", 1.0)
    assert s1 == s2   # seeded
    for bad, msg in ((["--temperature", -1], "--temperature"), (["--top-p", 0], "--top-p"),
                     (["--compare"], "--compare: .* needs a policy and the SFT run")):
        rc, _, err = run_generate(capsys, *base, *bad)
        assert rc == 1 and msg.split(":")[0] in err and "error" in err
    rm, _, _ = make_run(tmp_path / "rm", tiny_llama, {"reward": AdapterConfig(method="lora")}, role="reward", head=True)
    rc, _, err = run_generate(capsys, rm, "--prompt", "x")
    assert rc == 1 and "no policy to sample from" in err


def test_a_trained_sft_run_exports_and_generates_through_the_cli(tiny_llama, tmp_path):
    """The real run directory an SFT stage writes, through `align export` and `align generate`."""
    import align.stages.sft as sft
    from tests.test_sft import sft_cfg, synthetic_instructions
    data = (tiny_llama, synthetic_instructions(tmp_path / "d.jsonl", n=64))
    sft.run(sft_cfg(tmp_path, data, "train.max_steps=4", "data.eval_fraction=0", "train.eval_every=0"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "align.cli", *map(str, a)], capture_output=True, text=True, env=env)
    r = cli("export", tmp_path / "run", "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "exp" / "model.safetensors").is_file()
    r = cli("export", tmp_path / "run", "--out", tmp_path / "exp")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    prompt = ["--prompt", "swap: dog cat ->", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    a, b = cli("generate", tmp_path / "run", *prompt), cli("generate", tmp_path / "exp", *prompt)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["responses"]["sft"] == json.loads(b.stdout)["responses"]["model"]


def test_generate_reads_prompts_interactively_from_a_terminal(tiny_llama, tmp_path, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    run, _, _ = make_run(tmp_path, tiny_llama, HF_CASES["ia3"])
    monkeypatch.setattr(sys, "stdin", Terminal(f"{TEXTS[0]}\n{TEXTS[1]}\n\nnever read\n"))
    rc, out, err = run_generate(capsys, run, "--temperature", 0, "--max-new-tokens", 5, "--json")
    assert rc == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == TEXTS[:2]   # an empty line ends it
