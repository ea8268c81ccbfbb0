"""Any transformers architecture: decoder LLMs, a CLIP vision encoder and T5 encoder-decoders, upscaled through
the CLI, loaded with their Auto class (no missing or unexpected keys) and compared with the float64 reference;
--target patterns; clear errors for what cannot be upscaled."""

import json

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel

from helpers import FAITHFUL, edit_config, smile, upscale_argv
from reference import reference_model
from smile_cli.cli import run
from tiny_models import make_base, make_family, model_class

OPTIONS = ("--svd", "exact", "--router-rank", "2", "--expert-rank", "4", "--top-k", "2", *FAITHFUL)  # as the reference
AUTO_CLASSES = {"t5": AutoModelForSeq2SeqLM, "clip_vision": AutoModel}


def inputs_for(arch):
    generator = torch.Generator().manual_seed(0)
    if arch == "clip_vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    ids = torch.randint(2, 96, (2, 7), generator=generator)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, 96, (2, 5), generator=generator)}
    return {"input_ids": ids}


def outputs(model, arch, inputs):
    with torch.no_grad():
        result = model(**inputs)
    if arch == "clip_vision":
        return torch.cat([result.last_hidden_state.flatten(), result.pooler_output.flatten()]).double()
    return result.logits.double()


def load_checked(out, auto_class, unexpected=(), **kwargs):
    """The output loaded with its Auto class; fails on any missing, unexpected or mismatched key."""
    model, info = auto_class.from_pretrained(out, trust_remote_code=True, output_loading_info=True, **kwargs)
    assert not any(info[key] for key in ("missing_keys", "mismatched_keys", "error_msgs")), info
    assert set(info["unexpected_keys"]) == set(unexpected), info
    return model.eval()


def linear_names(folder, arch):
    """Every nn.Linear of the base's architecture, as transformers builds it."""
    model = model_class(arch).from_pretrained(folder)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("qwen3", {}),
        ("gemma", {}),
        ("phi3", {}),
        ("clip_vision", {}),
        ("t5", {}),
        ("t5", {"tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"}),
    ],
    ids=["qwen3", "gemma", "phi3", "clip-vision", "t5-tied", "t5-untied-gated"],
)
def test_architecture_matches_float64_reference(tmp_path, capsys, arch, overrides):
    base, experts = make_family(tmp_path, arch, **overrides)
    out = tmp_path / "out"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *OPTIONS))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    targets = config["smile_target_modules"]
    # default: every nn.Linear but the output head
    assert sorted(targets) == sorted(n for n in linear_names(base, arch) if n != "lm_head")
    assert config["architectures"] == ["Smile" + json.loads((base / "config.json").read_text())["architectures"][0]]
    if arch in ("clip_vision", "t5"):  # smile verify loads and runs every kind of output
        assert smile(capsys, "verify", out)[0] == 0
    model = load_checked(out, AUTO_CLASSES.get(arch, AutoModelForCausalLM))
    assert sum(type(m).__name__ == "SmileLinear" for m in model.modules()) == len(targets)
    reference = reference_model(base, experts, 2, 4, 2, targets=targets, model_class=model_class(arch))
    inputs = inputs_for(arch)
    want = outputs(reference, arch, inputs)
    torch.testing.assert_close(outputs(model, arch, inputs), want, rtol=1e-4, atol=1e-4)
    base_model = model_class(arch).from_pretrained(base, dtype=torch.float64).eval()
    assert (outputs(base_model, arch, inputs) - want).abs().max() > 1e-2  # the experts matter


def test_decoder_default_is_the_seven_projections_and_auto_model_loads(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    out = tmp_path / "out"
    assert smile(capsys, *upscale_argv(base, experts, out, *OPTIONS))[0] == 0
    config = json.loads((out / "config.json").read_text())
    kinds = {name.split(".", 3)[3] for name in config["smile_target_modules"]}
    assert kinds == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert len(config["smile_target_modules"]) == 14
    assert config["auto_map"] == {
        "AutoConfig": "configuration_smile.SmileMistralConfig",
        "AutoModel": "modeling_smile.SmileMistralModel",
        "AutoModelForCausalLM": "modeling_smile.SmileMistralForCausalLM",
        "AutoModelForSequenceClassification": "modeling_smile.SmileMistralForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_smile.SmileMistralForTokenClassification",
    } or set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    # the decoder without its head (as transformers' own MistralModel, it ignores lm_head.weight)
    bare = load_checked(out, AutoModel, unexpected={"lm_head.weight"})
    assert type(bare).__name__ == "SmileMistralModel"
    assert sum(type(m).__name__ == "SmileLinear" for m in bare.modules()) == 14


def test_target_patterns_choose_the_upscaled_modules(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    out = tmp_path / "out"
    code, err = smile(
        capsys, *upscale_argv(base, experts, out, *OPTIONS, "--target", "*.q_proj, v_proj,model.layers.0.mlp.*")
    )
    assert code == 0, err
    targets = json.loads((out / "config.json").read_text())["smile_target_modules"]
    assert sorted(targets) == sorted(
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    )
    model = load_checked(out, AutoModelForCausalLM)
    reference = reference_model(base, experts, 2, 4, 2, targets=targets)
    inputs = inputs_for("mistral")
    want = outputs(reference, "mistral", inputs)
    torch.testing.assert_close(outputs(model, "mistral", inputs), want, rtol=1e-4, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "`model.layers.*.self_attn.q_proj`" in card and "`model.layers.{0}.mlp.up_proj`" in card
    assert "--target '*.q_proj,v_proj,model.layers.0.mlp.*'" in card
    argv = ["upscale", "--base", base, "--experts", experts[0], "--expert-rank", "4", "--target", "mlp.*", "--dry-run"]
    capsys.readouterr()
    assert run([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.*.mlp.up_proj" in printed and "q_proj" not in printed


def test_t5_encoder_only_generate_and_save_pretrained(tmp_path, capsys):
    base, experts = make_family(tmp_path, "t5", num_experts=2)
    out = tmp_path / "out"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *OPTIONS, "--target", "encoder.*", "--top-k", "1"))
    assert code == 0, err
    targets = json.loads((out / "config.json").read_text())["smile_target_modules"]
    assert len(targets) == 12 and all(t.startswith("encoder.") for t in targets)
    model = load_checked(out, AutoModelForSeq2SeqLM)
    reference = reference_model(base, experts, 2, 4, 1, targets=targets, model_class=model_class("t5"))
    inputs = inputs_for("t5")
    torch.testing.assert_close(outputs(model, "t5", inputs), outputs(reference, "t5", inputs), rtol=1e-4, atol=1e-4)
    generated = model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2
    model.save_pretrained(tmp_path / "again")
    again = load_checked(tmp_path / "again", AutoModelForSeq2SeqLM)
    assert torch.equal(outputs(again, "t5", inputs), outputs(model, "t5", inputs))


def _assert_error(capsys, argv, *needles):
    code, err = smile(capsys, *argv)
    errors = [line for line in err if line.startswith("error")]
    assert code == 2 and len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_target_errors_name_the_culprit(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    argv = ["upscale", "--base", base, "--experts", experts[0], "--dry-run"]
    _assert_error(capsys, [*argv, "--target", "*.q_proj,*.qq_proj"], "'*.qq_proj'", "matches no nn.Linear")
    _assert_error(capsys, [*argv, "--target", "model.norm"], "'model.norm'", "matches no nn.Linear")
    _assert_error(capsys, [*argv, "--target", "q_proj;rm"], "not a module-name pattern")
    tied_base, tied_experts = make_family(tmp_path / "qwen2", "qwen2", num_experts=1)
    tied = ["upscale", "--base", tied_base, "--experts", tied_experts[0], "--dry-run", "--target", "lm_head"]
    _assert_error(capsys, tied, "'lm_head'", "tied")


def test_unsupported_architectures_exit_2_naming_what_is_missing(tmp_path, capsys):
    gpt2 = make_base(
        tmp_path / "gpt2",
        GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32),
        cls=GPT2LMHeadModel,
    )
    argv = ["upscale", "--base", gpt2, "--experts", gpt2, "--dry-run"]
    _assert_error(capsys, argv, "GPT2LMHeadModel has no nn.Linear layer", "Conv1D")
    _assert_error(capsys, [*argv, "--target", "*.c_attn"], "'*.c_attn'", "Conv1D", "not nn.Linear")
    edit_config(gpt2, model_type="gpt-imaginary")
    _assert_error(capsys, argv, "'gpt-imaginary'", f"transformers {transformers.__version__}")
    edit_config(gpt2, model_type="gpt2", architectures=["GPT2ImaginaryModel"])
    _assert_error(capsys, argv, "'GPT2ImaginaryModel'", "not a model class")
