"""What real checkpoints have and the tiny test models did not: PAD == EOS, ChatML end of turn,
several EOS ids, a BOS, sliding-window attention, fused projections, 50k vocabularies.
Each test here failed on the code before the fix it names (issue 15)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    MistralConfig,
    MptConfig,
)

from align.backbone import load_backbone, load_tokenizer
from align.data.preferences import Group, tokenize_group
from align.data.sft import build_examples, encode_prompts
from align.generation import sample
from align.model import AlignModel
from align.rl.rollout import truncate_after_stop
from align.demo.tiny import build_tiny_model, make_tiny
from align.tokens import specials

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _retokenize(path, *, pad_is_eos=False, chatml=False, bos=False, gen_eos_extra=None):
    """Rewrite a tiny model's tokenizer (and config) the way a real checkpoint ships it."""
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    if chatml:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.chat_template = CHATML
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    if bos:
        tok.backend_tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                                          special_tokens=[(tok.bos_token, tok.bos_token_id)])])
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = ([tok.eos_token_id] + list(gen_eos_extra)) if gen_eos_extra \
        else tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pad_is_eos(tmp_path_factory):
    return _retokenize(make_tiny(tmp_path_factory.mktemp("padeos"), "llama", kv_heads=2), pad_is_eos=True)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return _retokenize(make_tiny(tmp_path_factory.mktemp("chatml"), "llama", kv_heads=2),
                       pad_is_eos=True, chatml=True)


# ------------------------------------------------------------------------------ 1. PAD, fingerprint
def test_fingerprint_is_the_checkpoints_whatever_the_seed_process_or_dtype(pad_is_eos):
    code = ("import sys, torch; torch.manual_seed(int(sys.argv[2])); "
            "from align.backbone import load_tokenizer, load_backbone; from align.model import AlignModel; "
            "t = load_tokenizer(sys.argv[1]); m = AlignModel(load_backbone(sys.argv[1], sys.argv[3], tokenizer=t)); "
            "print(m.fingerprint, float(m.backbone.get_input_embeddings().weight[t.pad_token_id].abs().sum()))")
    outs = {subprocess.run([sys.executable, "-c", code, str(pad_is_eos), str(seed), dtype], check=True,
                           capture_output=True, text=True).stdout.split()[-2:][0]
            for seed, dtype in ((0, "float32"), (1, "float32"), (7, "bfloat16"), (3, "float16"))}
    assert len(outs) == 1, outs
    tok = load_tokenizer(pad_is_eos)
    torch.manual_seed(123)
    model = AlignModel(load_backbone(pad_is_eos, tokenizer=tok))
    assert model.fingerprint in outs
    assert tok.pad_token_id != tok.eos_token_id and specials(tok).added_ids == (tok.pad_token_id,)
    assert model.backbone.get_input_embeddings().weight[tok.pad_token_id].abs().sum() == 0


def test_pad_is_never_sampled_and_takes_no_probability(pad_is_eos):
    tok = load_tokenizer(pad_is_eos)
    model = AlignModel(load_backbone(pad_is_eos, tokenizer=tok))
    with torch.no_grad():  # a PAD row that would win every argmax if it were not masked
        model.backbone.get_output_embeddings().weight[tok.pad_token_id] = 50.0
    ids = torch.tensor([tok("the happy dog", add_special_tokens=False).input_ids] * 16)
    logits = model(ids, role="base").logits
    assert torch.log_softmax(logits.float(), -1)[..., tok.pad_token_id].exp().max() == 0
    s = sample(model, ids, torch.ones_like(ids), role="base", max_new_tokens=12, temperature=1.5,
               stop_token_id=specials(tok).stop_ids, pad_token_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))
    real = torch.arange(12)[None] < s.lengths[:, None]
    assert not (s.tokens[real] == tok.pad_token_id).any()


# ------------------------------------------------------------------------------ 2. end of turn
def test_chatml_completion_ends_at_im_end_once(chatml):
    tok = load_tokenizer(chatml)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in specials(tok).stop_ids
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a happy dog"}]}
    (ex,), _ = build_examples([rec], tok, 256)
    completion = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]
    assert completion[-1] == im_end and completion.count(im_end) == 1
    assert ex.input_ids[-1] == im_end  # nothing after the end of turn (no "\n", no second EOS)
    # reward data ends at the same token
    tg = tokenize_group(Group(rec["messages"][:1], ["a happy dog", "sad"], [0, 1]), tok, 256)
    assert all(s[-1] == im_end and s.count(im_end) == s.count(im_end) for s in tg.sequences)
    assert all(s[-2] != im_end for s in tg.sequences)


def test_every_eos_id_of_the_generation_config_stops_a_response(tmp_path):
    path = make_tiny(tmp_path / "m", "llama", kv_heads=2)
    tok0 = AutoTokenizer.from_pretrained(str(path))
    other = tok0.convert_tokens_to_ids("<|unk|>")  # a second end-of-turn id, as Llama-3's <|eot_id|>
    _retokenize(path, gen_eos_extra=[other])
    tok = load_tokenizer(path)
    assert set(specials(tok).stop_ids) == {tok.eos_token_id, other}
    resp = torch.tensor([[5, 6, other, 7, 8], [5, tok.eos_token_id, 9, 9, 9]])
    out, lengths, has_stop = truncate_after_stop(resp, specials(tok).stop_ids, tok.pad_token_id)
    assert lengths.tolist() == [2, 1] and has_stop.all()
    assert out[0, 3:].eq(tok.pad_token_id).all()
    model = AlignModel(load_backbone(path, tokenizer=tok))
    with torch.no_grad():  # make the second id the model's only choice
        model.backbone.get_output_embeddings().weight[other] = 100.0
    ids = torch.tensor([tok("the dog", add_special_tokens=False).input_ids])
    s = sample(model, ids, torch.ones_like(ids), role="base", max_new_tokens=6, greedy=True,
               stop_token_id=specials(tok).stop_ids, pad_token_id=tok.pad_token_id)
    assert s.lengths.tolist() == [1] and s.tokens[0, 0] == other


# ------------------------------------------------------------------------------ 3. BOS
def test_bos_is_added_once_to_every_prompt(tmp_path):
    path = _retokenize(make_tiny(tmp_path / "m", "llama", kv_heads=2), bos=True)
    tok = load_tokenizer(path)
    bos = tok.bos_token_id
    assert specials(tok).bos_ids == (bos,)
    (p,) = encode_prompts([{"prompt": "the happy dog"}], "x", tok)
    assert p["ids"][0] == bos and p["ids"].count(bos) == 1
    (ex,), _ = build_examples([{"prompt": "the happy dog", "completion": " sings"}], tok, 64)
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1
    # a template that writes the BOS itself (Llama-3's <|begin_of_text|>) does not get a second one
    (ex2,), _ = build_examples([{"prompt": tok.bos_token + "the happy dog", "completion": " sings"}], tok, 64)
    assert ex2.input_ids[:2] != [bos, bos] and ex2.input_ids[0] == bos
    # a prompt cut from the left keeps its BOS in front
    (ex3,), rep = build_examples([{"prompt": "the happy dog " * 20, "completion": " sings"}], tok, 16)
    assert ex3.input_ids[0] == bos and len(ex3.input_ids) <= 16 and rep.prompt_truncated == 1


# ------------------------------------------------------------------------------ 4. one loader
def test_eval_loads_in_the_runs_dtype_on_the_runtime_device(tiny_llama, tmp_path):
    from align.evaluate import EvalConfig, build
    from tests.ppo_helpers import fake_reward_run, fake_sft_run, write_prompts
    sft = fake_sft_run(tiny_llama, tmp_path / "sft")
    rec = json.loads((sft / "backbone.json").read_text())
    (sft / "backbone.json").write_text(json.dumps({**rec, "dtype": "bfloat16"}))
    rm = fake_reward_run(tiny_llama, tmp_path / "rm")
    cfg = EvalConfig(sft_run=str(sft), reward_run=str(rm), policy_b="sft",
                     prompts=str(write_prompts(tmp_path / "p.jsonl", ["the dog"])))
    model, tok, rt = build(cfg)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert next(model.backbone.parameters()).device == rt.device
    cfg.dtype = "float32"
    model, _, _ = build(cfg)
    assert next(model.backbone.parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------ 5. architectures
def test_sliding_window_attention_matches_transformers(tmp_path):
    tok_path = make_tiny(tmp_path / "t", "llama")
    tok = AutoTokenizer.from_pretrained(str(tok_path))
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                        max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    hf = build_tiny_model(cfg)
    hf.save_pretrained(tmp_path / "mistral")
    tok.save_pretrained(tmp_path / "mistral")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mistral"), attn_implementation="eager").eval()
    t = load_tokenizer(tmp_path / "mistral")
    model = AlignModel(load_backbone(tmp_path / "mistral", tokenizer=t))
    ids = torch.tensor([t("the quick brown fox jumps over a lazy dog while happy people sing",
                          add_special_tokens=False).input_ids])
    assert ids.shape[1] > 8
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids, role="base").logits[..., :want.shape[-1]]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the cache agrees with the full forward past the window
    s1 = sample(model, ids[:, :5], torch.ones_like(ids[:, :5]), role="base", max_new_tokens=10, greedy=True)
    s2 = sample(model, ids[:, :5], torch.ones_like(ids[:, :5]), role="base", max_new_tokens=10, greedy=True,
                use_cache=False)
    assert torch.equal(s1.tokens, s2.tokens)


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_fused_projection_architectures_are_refused_at_load(name):
    """Fused q/k/v with ALiBi in the model's own attention code: refused with the reason (phi3 and
    gpt_neox, fused but served, are tests/test_arch_fused.py's)."""
    from align.arch import UnsupportedArchitecture
    if name == "bloom":
        cfg = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    else:
        cfg = MptConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4)
    with pytest.raises(UnsupportedArchitecture, match=rf"{name!r} is refused: .*fuses q/k/v.*ALiBi.*"
                                                      r"Supported: .*'gpt_neox'.*'phi3'"):
        AlignModel(build_tiny_model(cfg))


# ------------------------------------------------------------------------------ 6. logits where used
def test_logits_are_computed_only_at_the_positions_used(tiny_llama):
    from align.scoring import response_stats
    tok = load_tokenizer(tiny_llama)
    model = AlignModel(load_backbone(tiny_llama, tokenizer=tok))
    model.add_head("v")
    model.add_role("v", [], head="v")
    rows = []
    model.backbone.get_output_embeddings().register_forward_hook(
        lambda m, a, out: rows.append(out.shape[:-1].numel()))
    q = torch.randint(5, 300, (2, 20))
    r = torch.randint(5, 300, (2, 6))
    full = model(torch.cat([q, r], 1), role="base").logits[:, 19:-1]
    rows.clear()
    st = response_stats(model, q, torch.ones_like(q), r, torch.ones_like(r, dtype=torch.bool), ("base", "v"), 1.0,
                        logits=True)
    assert rows == [2 * 6]  # the response positions only, not 2 x 26
    torch.testing.assert_close(st["base"]["logits"], full)
    rows.clear()
    sample(model, q, torch.ones_like(q), role="base", max_new_tokens=3, greedy=True)
    assert rows == [2, 2, 2]  # the prefill computes the last position's logits only
