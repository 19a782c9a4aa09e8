"""HF peft interoperability (docs/invariants.md #6): what we write loads in peft with the same
logits, and what peft writes loads here with the same logits."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from align.adapters import AdapterConfig  # noqa: E402
from align.adapters.peft_format import load_adapter, save_adapter  # noqa: E402
from tests.conftest import load  # noqa: E402
from tests.test_adapters import randomize  # noqa: E402

CASES = {
    "lora": (AdapterConfig(method="lora", r=4, alpha=8),
             lambda fam: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"] if fam == "gpt2" else ["q_proj", "v_proj"],
                                         fan_in_fan_out=fam == "gpt2", task_type="CAUSAL_LM")),
    "lora_all_linear": (AdapterConfig(method="lora", r=2, alpha=4, target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
                        lambda fam: peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", task_type="CAUSAL_LM")),
    "prefix": (AdapterConfig(method="prefix", num_virtual_tokens=3),
               lambda fam: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
}
FAMILIES = {"lora": ["llama", "gpt2", "qwen2"], "lora_all_linear": ["llama"], "prefix": ["llama", "gpt2", "qwen2"]}
PARAMS = [(m, f) for m, fams in FAMILIES.items() for f in fams]


def ids_for(tok):
    return tok(["the happy dog sings a good song"], return_tensors="pt").input_ids


def peft_logits(pm, ids):
    out = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out[:, -ids.shape[1]:]


def check_export_loads_in_peft(path, tmp_path, config: AdapterConfig) -> None:
    """A randomised set of ``config`` saved by align loads in ``peft.PeftModel`` with our logits."""
    model, tok = load(path)
    model.add_adapter("sft", config)
    randomize(model.adapters["sft"])
    model.add_role("sft", ["sft"])
    ids = ids_for(tok)
    ours = model(ids, role="sft").logits
    save_adapter(model, "sft", tmp_path / "sft", backbone_name=str(path))
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "sft").eval()
    torch.testing.assert_close(peft_logits(pm, ids), ours, atol=1e-5, rtol=0)


def check_peft_adapter_imports(path, tmp_path, peft_config):
    """A randomised peft adapter saved by peft loads here with peft's logits; returns the set."""
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    pm = peft.get_peft_model(base, peft_config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    model, tok = load(path)
    ids = ids_for(tok)
    want = peft_logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="fingerprint"):  # peft's file carries no backbone fingerprint
        aset = load_adapter(model, "imported", tmp_path / "peft")
    model.add_role("imported", ["imported"])
    torch.testing.assert_close(model(ids, role="imported").logits, want, atol=1e-5, rtol=0)
    return aset


@pytest.mark.parametrize("method,family", PARAMS)
def test_export_loads_in_peft_with_identical_logits(tiny_paths, tmp_path, method, family):
    check_export_loads_in_peft(tiny_paths[family], tmp_path, CASES[method][0])


@pytest.mark.parametrize("method,family", PARAMS)
def test_peft_trained_adapter_imports_with_identical_logits(tiny_paths, tmp_path, method, family):
    check_peft_adapter_imports(tiny_paths[family], tmp_path, CASES[method][1](family))
