"""The default routing, `--routing auto`: likelihood-prompt for a decoder-only causal LM (defaults.CAUSAL_LM_ROUTING,
modeling_smile.prompt_routing_support), with faithful recorded as what serving engines run (config.json
smile_engine_routing); faithful for any other architecture; resolved when the plan is made. The resolved mode, never
"auto", is what config.json, smile_config.yaml, the manifest, the model card and the --json summary record; an
explicit --routing is kept as given; --resume, parts and assemble accept auto and the mode it resolves to alike."""

import json

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from helpers import edit_config, folder_hashes, smile, staging_of, upscale_argv
from reference import reference_model
from smile_cli import defaults
from smile_cli.cli import run
from smile_cli.modeling.modeling_smile import prompt_routing_support
from tiny_models import make_family, model_class

RANKS = ("--router-rank", "2", "--expert-rank", "4", "--svd", "exact")
# what differs between two builds of the same model with different routing: the metadata, never the weights
METADATA = {"config.json", "README.md", "smile_config.yaml", "smile_manifest.json"}
AUTO_NOTE = "chosen by --routing auto"
DEFAULT = defaults.CAUSAL_LM_ROUTING
LIKELIHOOD = ("--routing", "likelihood-prompt")


def cli_json(capsys, *argv) -> dict:
    """Run the CLI in-process with --json, which must succeed; its JSON summary."""
    capsys.readouterr()
    code = run([str(a) for a in (*argv, "--json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def built(capsys, base, experts, out, *options) -> dict:
    """Upscale (must succeed); the --json summary."""
    return cli_json(capsys, *upscale_argv(base, experts, out, *RANKS, *options))


def recorded(out) -> dict:
    """The routing as each metadata file of an output records it."""
    manifest = json.loads((out / "smile_manifest.json").read_text())
    return {
        "config": json.loads((out / "config.json").read_text())["smile_routing"],
        "options": yaml.safe_load((out / "smile_config.yaml").read_text())["routing"],
        "manifest": manifest["options"]["routing"],
        "manifest_auto": manifest.get("routing_auto"),
    }


def load(out, **overrides):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, **overrides).eval()


def made_with(out) -> str:
    card = (out / "README.md").read_text()
    return card.split("## Made with", 1)[1].split("```")[1].strip()


def test_the_rule():
    assert prompt_routing_support("llama", "LlamaForCausalLM", False) == (
        True,
        "LlamaForCausalLM is a decoder-only causal LM",
    )
    assert prompt_routing_support("qwen2", "Qwen2ForCausalLM", False)[0]
    assert prompt_routing_support("t5", "T5ForConditionalGeneration", True)[0] is False
    assert prompt_routing_support("clip_vision_model", "CLIPVisionModel", False)[0] is False
    # an encoder's causal-LM head (BERT), a decoder-only type's other heads, an encoder-decoder's decoder alone
    assert prompt_routing_support("bert", "BertLMHeadModel", False)[0] is False
    assert prompt_routing_support("llama", "LlamaForSequenceClassification", False)[0] is False
    assert prompt_routing_support("bart", "BartForCausalLM", False)[0] is False


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_default_on_a_causal_lm_is_likelihood_prompt_and_recorded_as_such(tmp_path, capsys, arch):
    base, experts = make_family(tmp_path, arch, num_experts=3)
    plan = cli_json(capsys, *upscale_argv(base, experts, tmp_path / "plan", *RANKS, "--dry-run"))
    assert plan["routing"] == "likelihood-prompt" == DEFAULT
    why = f"{plan['architecture']} is a decoder-only causal LM; {defaults.CAUSAL_LM_ROUTING_WHY}"
    assert plan["routing_auto"] == why
    default = tmp_path / "default"
    summary = built(capsys, base, experts, default)
    assert summary["routing"] == DEFAULT and summary["routing_auto"] == why
    assert recorded(default) == dict.fromkeys(("config", "options", "manifest"), DEFAULT) | {"manifest_auto": why}
    # serving engines, which cannot keep one mix per request, run the paper's per-token router instead
    assert json.loads((default / "config.json").read_text())["smile_engine_routing"] == "faithful"
    card = (default / "README.md").read_text()
    assert f"- Routing: `{DEFAULT}` ({AUTO_NOTE}: {why})" in card
    assert "(vLLM) run it as `faithful` (config.json `smile_engine_routing`)" in card
    assert "--routing" not in made_with(default)  # the default reproduces it
    # an explicit --routing likelihood-prompt build: the same weights and code; no engine routing (refused there)
    explicit = tmp_path / "explicit"
    summary = built(capsys, base, experts, explicit, *LIKELIHOOD)
    assert summary["routing"] == DEFAULT and summary["routing_auto"] is None
    assert recorded(explicit) == dict.fromkeys(("config", "options", "manifest"), DEFAULT) | {"manifest_auto": None}
    assert "smile_engine_routing" not in json.loads((explicit / "config.json").read_text())
    assert "--routing likelihood-prompt" in made_with(explicit)
    assert AUTO_NOTE not in (explicit / "README.md").read_text()
    a, b = folder_hashes(default), folder_hashes(explicit)
    assert set(a) == set(b)
    assert {name for name in a if a[name] != b[name]} == {"README.md", "smile_manifest.json", "config.json"}
    model = load(default)
    assert model.model.layers[0].mlp.up_proj.router.routing == DEFAULT
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # one expert for the whole sequence (the float64 reference of the choice: tests/test_routing.py): greedy
        # generation of one unpadded prompt gives the same tokens with the cache and without it
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, uncached)
        # loaded with the engine routing (as vLLM does), the default is the paper's router: the float64 reference
        faithful = load(default, smile_routing="faithful")
        reference = reference_model(base, experts, 2, 4, 1, model_class=model_class(arch))
        torch.testing.assert_close(faithful(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["t5", "clip_vision"])
def test_default_elsewhere_is_faithful_and_the_output_loads_and_runs(tmp_path, capsys, arch):
    from test_architectures import inputs_for, outputs

    base, experts = make_family(tmp_path, arch, num_experts=2)
    out = tmp_path / "out"
    summary = built(capsys, base, experts, out, "--top-k", "2")
    why = "is an encoder-decoder model" if arch == "t5" else "is not a causal LM"
    assert summary["routing"] == "faithful" and why in summary["routing_auto"]
    assert recorded(out) == dict.fromkeys(("config", "options", "manifest"), "faithful") | {
        "manifest_auto": summary["routing_auto"]
    }
    assert f"- Routing: `faithful` ({AUTO_NOTE}: {summary['routing_auto']})" in (out / "README.md").read_text()
    assert smile(capsys, "verify", out)[0] == 0
    auto_class = AutoModelForSeq2SeqLM if arch == "t5" else AutoModel
    model = auto_class.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    targets = json.loads((out / "config.json").read_text())["smile_target_modules"]
    reference = reference_model(base, experts, 2, 4, 2, targets=targets, model_class=model_class(arch))
    inputs = inputs_for(arch)
    torch.testing.assert_close(outputs(model, arch, inputs), outputs(reference, arch, inputs), rtol=1e-4, atol=1e-4)
    # an explicit prompt mode is refused before anything is written: one line, exit 2
    for mode in ("prompt-model", "spectral-prompt"):
        code, err = smile(capsys, *upscale_argv(base, experts, tmp_path / mode, *RANKS, "--routing", mode))
        assert code == 2 and len(err) == 1 and f"--routing {mode} needs a decoder-only causal LM" in err[0], err
        assert why in err[0] and not (tmp_path / mode).exists() and not staging_of(tmp_path / mode).exists()
    # the modeling code refuses such a config too (a config.json edited by hand)
    edit_config(out, smile_routing="prompt-model")
    with pytest.raises(ValueError, match="needs a decoder-only causal LM"):
        auto_class.from_pretrained(out, trust_remote_code=True)


def test_explicit_prompt_model_differs_from_the_default_in_routing_only(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    out = tmp_path / "prompt-model"
    summary = built(capsys, base, experts, out, "--routing", "prompt-model", "--top-k", "2")
    assert summary["routing"] == "prompt-model" and summary["routing_auto"] is None
    assert recorded(out) == dict.fromkeys(("config", "options", "manifest"), "prompt-model") | {"manifest_auto": None}
    assert (
        "--routing prompt-model" in made_with(out)
        and "- Routing: `prompt-model`, temperature 1 (--routing prompt-model)" in (out / "README.md").read_text()
    )
    # the default build of the same inputs differs from it in routing only: same weights
    default = tmp_path / "default"
    built(capsys, base, experts, default, "--top-k", "2")
    a, b = folder_hashes(out), folder_hashes(default)
    assert {name for name in a if a[name] != b[name]} == METADATA
    reference = reference_model(base, experts, 2, 4, 2)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        faithful = load(default, smile_routing="faithful")
        torch.testing.assert_close(faithful(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)
        assert (load(out)(ids).logits.double() - reference(ids).logits).abs().max() > 1e-3
    # an output of an older release (no smile_routing) routes with faithful, whatever the default is
    config = json.loads((out / "config.json").read_text())
    del config["smile_routing"]
    (out / "config.json").write_text(json.dumps(config))
    old = load(out)
    assert old.model.layers[0].mlp.up_proj.router.routing == "faithful"
    with torch.no_grad():
        torch.testing.assert_close(old(ids).logits, faithful(ids).logits, rtol=0, atol=0)


def test_auto_model_loads_a_prompt_model_output(tmp_path, capsys, mistral_family):
    """The rule reads the architecture the folder was built from, not the class loading it."""
    base, experts = mistral_family
    out = tmp_path / "out"
    built(capsys, base, experts, out, "--routing", "prompt-model")
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "SmileMistralModel" and model.layers[0].mlp.up_proj.router.routing == "prompt-model"
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_resume_and_parts_accept_auto_and_the_mode_it_resolves_to(tmp_path, capsys, mistral_family, monkeypatch):
    from smile_cli import staging as staging_module

    base, experts = mistral_family
    shards = ("--max-shard-size", "8KB", "--quiet")
    single = tmp_path / "single"
    built(capsys, base, experts, single, *shards)
    # a run started with an explicit --routing likelihood-prompt, interrupted, resumed with the default
    out = tmp_path / "out"
    original_add, calls = staging_module.Journal.add, []

    def add_then_interrupt(self, shard):
        original_add(self, shard)
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(staging_module.Journal, "add", add_then_interrupt)
    argv = upscale_argv(base, experts, out, *RANKS, *shards)
    assert smile(capsys, *argv, *LIKELIHOOD)[0] == 130
    monkeypatch.setattr(staging_module.Journal, "add", original_add)
    # resuming with another mode is refused and says what changed
    code, err = smile(capsys, *argv, "--routing", "prompt-model", "--resume")
    assert code == 2 and len(err) == 1 and "routing 'likelihood-prompt' -> 'prompt-model'" in err[0], err
    assert smile(capsys, *argv, "--resume")[0] == 0  # auto resolves to the same mode: accepted
    assert folder_hashes(out) == folder_hashes(single)  # and finished as a default run (its card)
    assert smile(capsys, *argv, *LIKELIHOOD, "--resume")[0] == 0  # complete: nothing to do
    # parts: one part given the mode, one by default; the card follows part 0, as assemble's command does
    parts = tmp_path / "parts"
    argv = upscale_argv(base, experts, parts, *RANKS, *shards)
    assert smile(capsys, *argv, "--shard", "0/2")[0] == 0
    assert smile(capsys, *argv, "--shard", "1/2", *LIKELIHOOD)[0] == 0
    assert smile(capsys, "assemble", parts, "--quiet")[0] == 0
    assert folder_hashes(parts) == folder_hashes(single)
    # parts made with different modes are not assembled
    mixed = tmp_path / "mixed"
    argv = upscale_argv(base, experts, mixed, *RANKS, *shards)
    assert smile(capsys, *argv, "--shard", "0/2")[0] == 0
    assert smile(capsys, *argv, "--shard", "1/2", "--routing", "prompt-model")[0] == 0
    code, err = smile(capsys, "assemble", mixed)
    assert code == 2 and "routing 'likelihood-prompt' -> 'prompt-model'" in err[-1], err


def test_config_file_routing(tmp_path, capsys, mistral_family):
    """`routing:` in a --config file is given as on the command line; `auto` there is the default's rule."""
    base, experts = mistral_family
    for routing, want, note in (("auto", DEFAULT, True), ("prompt-model", "prompt-model", False)):
        config = tmp_path / f"{routing}.yaml"
        config.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts], "routing": routing}))
        out = tmp_path / routing
        code, _ = smile(capsys, "upscale", "--config", config, *RANKS, "--out", out, "--quiet")
        assert code == 0 and recorded(out)["config"] == want and (AUTO_NOTE in (out / "README.md").read_text()) == note
