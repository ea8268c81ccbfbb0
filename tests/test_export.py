"""smile export: an expert as a PEFT LoRA adapter or as a dense model gives the SMILE model's logits with every
token routed to that expert."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import smile, upscaled
from tiny_models import make_family

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


OPTIONS = ("--router-rank", "2", "--quiet")


def routed_logits(folder, expert):
    """Logits of the SMILE model with every SmileLinear's routing forced to a one-hot on expert."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    one_hot = torch.nn.functional.one_hot(torch.tensor(expert), model.config.num_local_experts).float()
    model.register_routing_hook(lambda name, w: one_hot.expand_as(w))
    with torch.no_grad():
        return model(IDS).logits


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama_bias"), "llama", attention_bias=True, mlp_bias=True)


def test_lora_export_loads_in_peft_and_matches_routed_expert(tmp_path, capsys, mistral_family):
    from peft import PeftModel

    base, experts = mistral_family
    folder = upscaled(base, experts, tmp_path / "smile", *OPTIONS, "--expert-rank", "4")
    code, err = smile(capsys, "export", folder, tmp_path / "lora", "--expert", "1", "--as", "lora", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str(base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "lora"
    )
    want = routed_logits(folder, 1)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert (logits(AutoModelForCausalLM.from_pretrained(base)) - want).abs().max() > 1e-2  # the expert matters
    # dense export of the same expert: a plain model of the base architecture
    code, err = smile(capsys, "export", folder, tmp_path / "dense", "--expert", "1", "--as", "dense", "--quiet")
    assert code == 0, err
    dense_config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert dense_config["model_type"] == "mistral" and dense_config["architectures"] == ["MistralForCausalLM"]
    assert "auto_map" not in dense_config and "rank_of_expert" not in dense_config
    assert not list((tmp_path / "dense").glob("*.py"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    torch.testing.assert_close(logits(dense), want, rtol=1e-5, atol=1e-5)


def test_biased_expert_refuses_lora_and_exports_dense(tmp_path, capsys, llama_bias):
    base, experts = llama_bias
    folder = upscaled(base, experts, tmp_path / "smile", *OPTIONS, "--expert-rank", "4")
    code, err = smile(capsys, "export", folder, tmp_path / "lora", "--expert", "2", "--as", "lora")
    assert code == 2 and "cannot express" in err[-1] and "--as dense" in err[-1]
    assert not (tmp_path / "lora").exists()
    code, err = smile(capsys, "export", folder, tmp_path / "dense", "--expert", "2", "--as", "dense", "--quiet")
    assert code == 0, err
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    torch.testing.assert_close(logits(dense), routed_logits(folder, 2), rtol=1e-5, atol=1e-5)


def test_dense_experts_export_dense_only(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    folder = upscaled(
        base, experts[:2], tmp_path / "smile", *OPTIONS, "--expert-rank", "full", "--max-shard-size", "40KB"
    )
    code, err = smile(capsys, "export", folder, tmp_path / "lora", "--expert", "0", "--as", "lora")
    assert code == 2 and "--as dense" in err[-1]
    out = tmp_path / "dense"
    code, err = smile(capsys, "export", folder, out, "--expert", "0", "--as", "dense", "--max-shard-size", "40KB", "-q")
    assert code == 0, err
    assert (out / "model.safetensors.index.json").is_file()  # sharded like any checkpoint
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(dense), routed_logits(folder, 0), rtol=1e-5, atol=1e-5)
    # with dense experts the export is the fine-tune itself
    torch.testing.assert_close(
        logits(dense), logits(AutoModelForCausalLM.from_pretrained(experts[0])), rtol=1e-5, atol=1e-5
    )


def test_bad_export_arguments(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    code, err = smile(capsys, "export", base, tmp_path / "x", "--expert", "0")
    assert code == 2 and "not a SMILE model folder" in err[-1]
    folder = upscaled(base, experts[:2], tmp_path / "smile", *OPTIONS, "--expert-rank", "2")
    code, err = smile(capsys, "export", folder, tmp_path / "x", "--expert", "2")
    assert code == 2 and "out of range" in err[-1]
    code, err = smile(capsys, "export", folder, tmp_path / "x", "--expert", "0", "--as", "gguf")
    assert code == 2 and "lora or dense" in err[-1]
