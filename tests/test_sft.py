"""SFT stage: completion-only masking, learning, exact resume, W&B offline, config errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import align.stages.sft as sft
from align.config import load_config
from align.data.sft import IGNORE, Collator, build_examples, pack, tokenize_pair, TruncationReport
from tests.conftest import load

ALL_LINEAR = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head"


def synthetic_instructions(path, n=480, seed=0):
    """'swap: A B' -> ' B A.' over a small vocabulary: learnable, with held-out prompts."""
    words = "happy sad dog cat song rain sun music story plot actor scene".split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(words, 2)
            f.write(json.dumps({"prompt": f"swap: {a} {b} ->", "completion": f" {b} {a}."}) + "\n")
    return path


def sft_cfg(tmp_path, data, *extra, name="run"):
    return load_config(sft.SFTConfig, None, [
        f"output_dir={tmp_path / name}", f"model.path={data[0]}", f"data.train={data[1]}", "data.eval_fraction=0.15",
        "data.max_length=32", "data.num_samples=2", "data.max_new_tokens=6", "train.batch_size=16",
        "train.lr=1e-2", "train.warmup_steps=5", "train.eval_every=20", "tracking.wandb=false",
        f"adapter.target_modules={ALL_LINEAR}", *extra])


def test_completion_only_labels_are_exact(tiny_llama):
    _, tok = load(tiny_llama)
    recs = [{"prompt": "the happy dog", "completion": " sings a song"}]
    (ex,), rep = build_examples(recs, tok, max_length=64, completion_only=True)
    p = tok("the happy dog", add_special_tokens=False).input_ids
    c = tok(" sings a song", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [IGNORE] * len(p) + c          # loss on the completion and its EOS only
    (full,), _ = build_examples(recs, tok, max_length=64, completion_only=False)
    assert full.labels == p + c
    batch = Collator(tok.pad_token_id)([ex, full])
    assert batch["labels"][0].tolist()[len(p) + len(c):] == [IGNORE] * (batch["labels"].shape[1] - len(p) - len(c))
    assert rep.examples == 1 and rep.prompt_truncated == 0


def test_truncation_cuts_the_prompt_first_and_counts_every_cut(tiny_llama):
    _, tok = load(tiny_llama)
    rep = TruncationReport()
    p, c = tokenize_pair("the happy dog sings a good song " * 4, " bad rain", tok, 12, rep)
    assert len(p) + len(c) == 12 and c[-1] == tok.eos_token_id and rep.prompt_truncated == 1
    p, c = tokenize_pair("the", " happy dog sings a good song " * 4, tok, 12, rep)
    assert len(p) == 1 and len(c) == 11 and rep.completion_truncated == 1 and c[-1] != tok.eos_token_id


def test_packing_keeps_examples_apart(tiny_llama):
    model, tok = load(tiny_llama)
    exs, _ = build_examples([{"prompt": "the dog", "completion": " sings"}, {"prompt": "a cat", "completion": " runs"}],
                            tok, 32)
    rows = pack(exs, 32)
    assert len(rows) == 1 and rows[0]["segment_ids"][-1] == 2
    b = Collator(tok.pad_token_id, packed=True)(rows)
    packed = model(b["input_ids"], b["attention_mask"], segment_ids=b["segment_ids"], role="base").logits[0]
    n0 = len(exs[0].input_ids)
    for k, ex in enumerate(exs):
        alone = model(torch.tensor([ex.input_ids]), role="base").logits[0]
        sl = slice(0, n0) if k == 0 else slice(n0, n0 + len(ex.input_ids))
        torch.testing.assert_close(packed[sl], alone, atol=1e-5, rtol=0)


def test_packed_loss_has_no_term_across_a_segment_boundary(tiny_llama):
    """Issue 16: with completion_only_loss=false the last token of example i used to predict the
    first token of example i+1. A packed row must give the same summed loss and the same number
    of counted tokens as its examples one by one."""
    from align.rl.losses import lm_loss
    model, tok = load(tiny_llama)
    recs = [{"prompt": "the dog", "completion": " sings"}, {"prompt": "a cat", "completion": " runs"},
            {"prompt": "rain", "completion": " falls on the song"}]
    for completion_only in (False, True):
        exs, _ = build_examples(recs, tok, 64, completion_only=completion_only)
        (row,) = pack(exs, 64)
        starts = [sum(len(e.input_ids) for e in exs[:k]) for k in range(len(exs))]
        assert all(row["labels"][s] == IGNORE for s in starts)
        b = Collator(tok.pad_token_id, packed=True)([row])
        with torch.no_grad():
            loss, n = lm_loss(model(b["input_ids"], b["attention_mask"], segment_ids=b["segment_ids"],
                                    role="base").logits, b["labels"])
            alone = [lm_loss(model(torch.tensor([e.input_ids]), role="base").logits, torch.tensor([e.labels]))
                     for e in exs]
        assert int(n) == sum(int(m) for _, m in alone)
        torch.testing.assert_close(loss * n, sum(l * m for l, m in alone), atol=1e-4, rtol=1e-5)


def test_held_out_loss_falls_well_below_its_start(tiny_llama, tmp_path):
    data = (tiny_llama, synthetic_instructions(tmp_path / "d.jsonl"))
    out = sft.run(sft_cfg(tmp_path, data, "train.max_steps=80"))
    evals = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if "eval/loss" in m]
    assert out["eval_examples"] > 20
    # measured 2026-12-02: 5.95 -> 1.46 (0.25 of the start) in 80 steps
    assert evals[-1]["eval/loss"] < 0.35 * evals[0]["eval/loss"], evals
    samples = [json.loads(ln) for ln in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("completion" in s for s in samples)
    assert (tmp_path / "run" / "adapters" / "sft" / "adapter_config.json").exists()


def test_empty_eval_split_is_refused_when_configured_and_silent_when_absent(tiny_llama, tmp_path):
    """Issue 16: an empty eval split logged eval/loss 0.0 and perplexity 1.0."""
    from align.config import ConfigError
    data = (tiny_llama, synthetic_instructions(tmp_path / "d.jsonl", n=40))
    # a fraction that holds out nothing: refused, naming the setting, before the run dir exists
    with pytest.raises(ConfigError, match=r"data.eval_fraction=0.0001 holds out no eval records from .*d.jsonl"):
        sft.run(sft_cfg(tmp_path, data, "data.eval_fraction=0.0001", name="tiny_fraction"))
    assert not (tmp_path / "tiny_fraction").exists()
    # a held-out file without records: refused, naming the file
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"data.eval: .*empty.jsonl holds no records"):
        sft.run(sft_cfg(tmp_path, data, f"data.eval={tmp_path / 'empty.jsonl'}", name="empty_file"))
    assert not (tmp_path / "empty_file").exists()
    # no eval data asked for (fraction 0, no file): training runs and logs no eval numbers
    out = sft.run(sft_cfg(tmp_path, data, "data.eval_fraction=0", "train.max_steps=3", "train.eval_every=1",
                          "train.batch_size=8", name="no_eval"))
    logged = [json.loads(x) for x in (tmp_path / "no_eval" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in logged)
    assert not any(k.startswith("eval/") for m in logged for k in m), logged
    assert out["eval_examples"] == 0 and "eval/loss" not in out


def test_kill_and_resume_gives_bitwise_identical_adapters(tiny_llama, tmp_path):
    data = (tiny_llama, synthetic_instructions(tmp_path / "d.jsonl"))
    common = ["train.max_steps=12", "train.save_every=4", "adapter.dropout=0.1", "train.grad_accum=2",
              "train.batch_size=8"]
    sft.run(sft_cfg(tmp_path, data, *common, name="full"))
    assert sft.run(sft_cfg(tmp_path, data, *common, "train.stop_after_steps=6", name="killed")) == {"stopped_at": 6}
    # a kill in the middle of writing the next checkpoint leaves the previous one usable
    (tmp_path / "killed" / "checkpoints" / ".tmp_step_8").mkdir()
    sft.run(sft_cfg(tmp_path, data, *common, "resume=true", name="killed"))
    a = load_file(tmp_path / "full" / "adapters" / "sft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapters" / "sft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_res = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(m_full) == strip(m_res)


def test_wandb_offline_run_holds_the_logged_metrics(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = (tiny_llama, synthetic_instructions(tmp_path / "d.jsonl", n=120))
    sft.run(sft_cfg(tmp_path, data, "train.max_steps=4", "train.log_every=1", "tracking.wandb=true",
                    "tracking.project=align-test"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = wandb_history(next(runs[0].glob("*.wandb")))
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 4
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [float(r["loss"]) for r in losses] == pytest.approx([m["loss"] for m in logged])
    assert "WANDB_API_KEY" not in (tmp_path / "run" / "config.yaml").read_text()


def wandb_history(path):
    """History rows of a W&B run file: a LevelDB-style log (32 KiB blocks of CRC/length/type
    chunks after a 7-byte header) of protobuf ``Record``s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    data, i, block, chunks, buf = path.read_bytes(), 7, 32768, [], b""
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if length == 0 and kind == 0:
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + length], i + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            buf = (buf if kind == 3 else b"") + chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    rows = []
    for c in chunks:
        rec = pb.Record()
        rec.ParseFromString(c)
        if rec.WhichOneof("record_type") == "history":
            rows.append({it.key or "/".join(it.nested_key): it.value_json for it in rec.history.item})
    return rows


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "train.lrr"),
    ("train.lr=fast", "train.lr"),
    ("data.train=/nonexistent.jsonl", "data.train"),
])
def test_bad_config_exits_non_zero_with_a_clear_message(tmp_path, override, message):
    r = subprocess.run([sys.executable, "-m", "align.cli", "sft", f"output_dir={tmp_path / 'x'}", override],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert message in r.stderr
    assert not (tmp_path / "x").exists()  # failed before any work


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_conversations_render_through_the_chat_template_split_before_the_last_reply(tiny_llama):
    from align.data.sft import render
    _, tok = load(tiny_llama)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "name a dog"}, {"role": "assistant", "content": "Rex"}]
    p, c = render({"messages": msgs}, tok, CHATML)
    assert p == "<|user|>hi\n<|assistant|>hello\n<|user|>name a dog\n<|assistant|>" and c == "Rex\n"
    # the conversational prompt/completion form gives the same split
    assert render({"prompt": msgs[:3], "completion": msgs[3:]}, tok, CHATML) == (p, c)
    assert render({"prompt": "a", "completion": " b"}, tok, CHATML) == ("a", " b")
    with pytest.raises(ValueError, match="assistant"):
        render({"messages": msgs[:1]}, tok, CHATML)
    # what PPO, the reward normalisation and `align eval` give the policy to continue
    from align.data.sft import prompt_text
    assert prompt_text(msgs[:3], tok, CHATML) == p
    assert prompt_text("Review of the bistro:", tok, CHATML) == "Review of the bistro:"


def test_the_same_run_in_two_processes_writes_byte_identical_adapters(tiny_llama, tmp_path):
    """What the README claims reproducible: one commit, one machine, the same thread count and
    torch build give the same numbers. Two fresh processes run the same SFT (training, eval
    samples) and write byte-identical adapter files and identical metrics."""
    import hashlib
    import subprocess
    import sys
    data = synthetic_instructions(tmp_path / "d.jsonl", n=160)
    outs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "align.cli", "sft", f"output_dir={tmp_path / name}", f"model.path={tiny_llama}",
               f"data.train={data}", "data.eval_fraction=0.15", "data.max_length=32", "data.num_samples=2",
               "data.max_new_tokens=6", "train.batch_size=16", "train.lr=1e-2", "train.max_steps=12",
               "train.eval_every=6", "tracking.wandb=false"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        f = tmp_path / name / "adapters" / "sft" / "adapter_model.safetensors"
        metrics = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                   for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        outs.append((hashlib.sha256(f.read_bytes()).hexdigest(), metrics,
                     (tmp_path / name / "samples.jsonl").read_text()))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == outs[1][1] and outs[0][2] == outs[1][2]
