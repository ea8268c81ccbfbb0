"""Fine-tunes as they are published: added tokens and chat templates (--tokenizer, --chat-template), another
vocabulary, mixed dtypes, another tensor-name prefix, quantized checkpoints, changed embeddings and norms, and the
Hub metadata of the model card. Every output is loaded with AutoModelForCausalLM and AutoTokenizer."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FAITHFUL, smile, upscale_argv
from reference import reference_model
from tiny_models import make_family
from tiny_vocab import (
    CHATML,
    PLAIN,
    VOCAB_SIZE,
    convert_dtype,
    grow_embeddings,
    quantize_like,
    rename_tensors,
    save_tokenizer,
    set_token_ids,
)

RANKS = ("--router-rank", "2", "--expert-rank", "4", "--svd", "exact", *FAITHFUL)  # as the reference
CHAT = [{"role": "user", "content": "hello world"}]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def chatml_family(root, arch="mistral"):
    """A base with the tiny tokenizer and no template; expert 1 adds <|im_start|> and <|im_end|> (ids 96, 97,
    trained rows) and a ChatML template; expert 2 keeps the base's tokenizer."""
    base, experts = make_family(root, arch, num_experts=2)
    save_tokenizer(base)
    save_tokenizer(experts[0], added=("<|im_start|>", "<|im_end|>"), template=CHATML, eos="<|im_end|>")
    grow_embeddings(experts[0], VOCAB_SIZE + 2, seed=7)
    end = AutoTokenizer.from_pretrained(experts[0]).convert_tokens_to_ids("<|im_end|>")
    set_token_ids(experts[0], eos_token_id=end)  # as dolphin: a turn ends with <|im_end|> (id 96 here, too)
    save_tokenizer(experts[1])
    return base, experts


def load(out):
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out, trust_remote_code=True)


def chat_and_generate(model, tokenizer) -> list[int]:
    """apply_chat_template + generate, with and without the KV cache (same greedy tokens)."""
    encoded = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    outputs = [
        model.generate(**encoded, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=cache, pad_token_id=0)
        for cache in (True, False)
    ]
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0].shape[1] == encoded["input_ids"].shape[1] + 4
    return encoded["input_ids"][0].tolist()


def check_base_rows_and_logits(out, base, experts, model):
    """Base tokens keep the base's rows; for them the logits are the float64 reference's."""
    state, base_state = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(state[EMBED][:VOCAB_SIZE], base_state[EMBED])
    reference = reference_model(base, experts, 2, 4, 1)
    ids = torch.randint(0, VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits.double()[..., :VOCAB_SIZE], reference(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_union_adds_an_experts_chatml_tokens_with_its_rows_and_template(tmp_path, capsys):
    base, experts = chatml_family(tmp_path)
    out = tmp_path / "union"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS, "--tokenizer", "union"))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB_SIZE + 2
    state, expert_state = load_file(out / "model.safetensors"), load_file(experts[0] / "model.safetensors")
    for name in (EMBED, HEAD):
        assert state[name].shape[0] == VOCAB_SIZE + 2
        assert torch.equal(state[name][VOCAB_SIZE:], expert_state[name][VOCAB_SIZE:])  # exactly the expert's rows
    assert (out / "chat_template.jinja").read_text() == CHATML
    model, tokenizer = load(out)
    assert len(tokenizer) == VOCAB_SIZE + 2 == model.get_input_embeddings().weight.shape[0]
    chatml = ["<|im_start|>", "<|im_end|>"]
    start, end = AutoTokenizer.from_pretrained(experts[0]).convert_tokens_to_ids(chatml)
    assert tokenizer.convert_tokens_to_ids(chatml) == [start, end] and {start, end} == {96, 97}  # the expert's ids
    assert {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} >= {"<|im_start|>", "<|im_end|>"}
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")  # the base's special tokens
    assert config["eos_token_id"] == tokenizer.eos_token_id == 2
    ids = chat_and_generate(model, tokenizer)
    assert ids[0] == start and end in ids  # the template's tokens are single tokens
    check_base_rows_and_logits(out, base, experts, model)
    tokenizer.save_pretrained(tmp_path / "again")  # AutoTokenizer round-trips
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.get_vocab() == tokenizer.get_vocab() and again.chat_template == CHATML
    card = (out / "README.md").read_text()
    assert (
        f"`<|im_start|>`: id {start}" in card
        and f"Chat template: shared by the expert(s) that have one: {experts[0]}" in card
    )
    assert "--tokenizer union" in card

    # --tokenizer 1: the expert's own tokenizer files, the same rows
    taken = tmp_path / "taken"
    code, err = smile(capsys, *upscale_argv(base, experts, taken, *RANKS, "--tokenizer", "1", "-q"))
    assert code == 0, err
    assert (taken / "tokenizer.json").read_bytes() == (experts[0] / "tokenizer.json").read_bytes()
    assert load_file(taken / "model.safetensors")[EMBED].equal(state[EMBED])
    model, tokenizer = load(taken)
    assert json.loads((taken / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id == end
    assert model.generation_config.eos_token_id == end  # the expert's generation_config.json with its tokenizer
    chat_and_generate(model, tokenizer)

    # the default (the base's tokenizer): the template's tokens would be split, which a warning says
    plain = tmp_path / "plain"
    code, err = smile(capsys, *upscale_argv(base, experts, plain, *RANKS))
    assert code == 0 and any("--tokenizer union" in line and "<|im_start|>" in line for line in err), err
    assert json.loads((plain / "config.json").read_text())["vocab_size"] == VOCAB_SIZE
    assert (plain / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_two_experts_adding_one_token_at_different_ids_tied_embeddings(tmp_path, capsys):
    """Tied head and embeddings (as Qwen2, Gemma). Expert 1 adds <tool> (id 96); expert 2 adds <extra> (96) and
    <tool> (97): <tool> gets the mean of both experts' rows, matched by string, never by id. (A tied Mistral:
    transformers reads a qwen2 folder's tokenizer as Qwen2's byte-level BPE, which a word-level vocabulary is not.)"""
    base, experts = make_family(tmp_path, "mistral", num_experts=2, tie_word_embeddings=True)
    save_tokenizer(base, template=PLAIN)
    save_tokenizer(experts[0], added=("<tool>",))
    grow_embeddings(experts[0], VOCAB_SIZE + 1, seed=1)
    save_tokenizer(experts[1], added=("<extra>", "<tool>"))
    grow_embeddings(experts[1], VOCAB_SIZE + 2, seed=2)
    out = tmp_path / "out"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS, "--tokenizer", "union"))
    assert code == 0, err
    state = load_file(out / "model.safetensors")
    assert HEAD not in state  # tied: one tensor
    one, two = (load_file(e / "model.safetensors")[EMBED] for e in experts)
    assert torch.equal(state[EMBED][96], ((one[96].double() + two[97].double()) / 2).float())
    assert torch.equal(state[EMBED][97], two[96])
    model, tokenizer = load(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    assert tokenizer.convert_tokens_to_ids(["<tool>", "<extra>"]) == [96, 97]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 98
    card = (out / "README.md").read_text()
    assert "token '<tool>' is id 96 in the output (97 in" in card and "the mean of" in card
    with torch.no_grad():
        logits = model(torch.tensor([[6, 96, 97]])).logits
    assert logits.shape[-1] == 98
    chat_and_generate(model, tokenizer)


def test_vocabulary_options_in_dry_run_json(tmp_path, capsys):
    from smile_cli.cli import run

    base, experts = chatml_family(tmp_path)
    config = tmp_path / "job.yaml"  # `tokenizer:` in a config file
    config.write_text(yaml.safe_dump({"base": str(base), "experts": list(map(str, experts)), "tokenizer": "union"}))
    capsys.readouterr()
    assert run(["upscale", "--config", str(config), *RANKS, "--dry-run"]) == 0
    assert "<|im_end|> (id 96), <|im_start|> (id 97)" in capsys.readouterr().out  # the expert's ids
    argv = [str(a) for a in upscale_argv(base, experts, tmp_path / "o", *RANKS, "--tokenizer", "union")]
    assert run([*argv, "--dry-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocabulary"]["tokenizer"] == "union" and summary["vocabulary"]["vocab_size"] == 98
    assert summary["vocabulary"]["new_tokens"] == {"<|im_end|>": 96, "<|im_start|>": 97}
    assert summary["vocabulary"]["chat_template"].endswith(f"have one: {experts[0]}")
    assert not (tmp_path / "o").exists()
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert run([*argv, "--chat-template", str(template), "-q"]) == 0
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == template.read_text()
    assert "Chat template: the file mine.jinja" in (tmp_path / "o" / "README.md").read_text()
    chat_and_generate(*load(tmp_path / "o"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--tokenizer", "3"), "there are 2 experts"),
        (("--chat-template", "2"), "has no chat template"),
        (("--chat-template", "/no/such/file.jinja"), "readable file"),
        (("--tokenizer", "everything"), "use base, union, or N"),
    ],
)
def test_bad_vocabulary_options(tmp_path, capsys, extra, needle):
    base, experts = chatml_family(tmp_path)
    out = tmp_path / "out"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS, *extra))
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_expert_with_another_base_vocabulary_is_refused_unless_accepted(tmp_path, capsys):
    base, experts = make_family(tmp_path, "mistral", num_experts=2)
    save_tokenizer(base, template=PLAIN)
    save_tokenizer(experts[0], swap=("hello", "world"))
    save_tokenizer(experts[1], added=("<x>",))
    grow_embeddings(experts[1], VOCAB_SIZE + 1, seed=3)
    out = tmp_path / "out"
    for extra in ((), ("--tokenizer", "union")):
        code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS, *extra))
        assert code == 2 and len(err) == 1, err
        assert str(experts[0]) in err[0] and "'hello'" in err[0] and "--allow-vocab-mismatch" in err[0]
        assert not out.exists()
    argv = upscale_argv(base, experts, out, *RANKS, "--tokenizer", "union", "--allow-vocab-mismatch")
    code, err = smile(capsys, *argv)
    assert code == 0 and any("accepted (--allow-vocab-mismatch)" in line for line in err), err
    model, tokenizer = load(out)
    assert len(tokenizer) == VOCAB_SIZE + 1 and tokenizer.convert_tokens_to_ids("hello") == 6  # the base's ids
    chat_and_generate(model, tokenizer)
    assert "not an extension of the base's" in (out / "README.md").read_text()


def test_float16_expert_next_to_a_bfloat16_base(tmp_path, capsys):
    base, experts = make_family(tmp_path, "mistral", num_experts=2, dtype=torch.bfloat16)
    save_tokenizer(base, template=PLAIN)
    convert_dtype(experts[0], torch.float16)
    out = tmp_path / "auto"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS))
    assert code == 0, err
    assert {t.dtype for n, t in load_file(out / "model.safetensors").items() if "router" not in n} == {torch.bfloat16}
    assert "Weights: bfloat16 (--dtype auto: the base's" in (out / "README.md").read_text()
    chat_and_generate(*load(out))
    wide = tmp_path / "f32"
    code, err = smile(capsys, *upscale_argv(base, experts, wide, *RANKS, "--dtype", "float32"))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(wide, trust_remote_code=True, dtype=torch.float64).eval()
    reference = reference_model(base, experts, 2, 4, 1)
    ids = torch.randint(0, VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 1e-4


def test_expert_saved_from_the_bare_model_class(tmp_path, capsys):
    base, experts = make_family(tmp_path, "mistral", num_experts=2)
    save_tokenizer(base, template=PLAIN)
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float32).model.save_pretrained(bare)
    assert "layers.0.self_attn.q_proj.weight" in load_file(bare / "model.safetensors")
    code, err = smile(capsys, *upscale_argv(base, [bare, experts[1]], tmp_path / "from_bare", *RANKS))
    assert code == 0 and any("prefix ''" in line and "'model.'" in line for line in err), err
    code, err = smile(capsys, *upscale_argv(base, experts, tmp_path / "from_full", *RANKS, "-q"))
    assert code == 0, err
    got, want = (load_file(tmp_path / name / "model.safetensors") for name in ("from_bare", "from_full"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    chat_and_generate(*load(tmp_path / "from_bare"))

    other = tmp_path / "gpt2-like"
    shutil.copytree(experts[0], other)
    rename_tensors(other, lambda name: "transformer." + name.removeprefix("model.").replace("layers.", "h."))
    code, err = smile(capsys, *upscale_argv(base, [other, experts[1]], tmp_path / "out", *RANKS))
    assert code == 2 and len(err) == 1 and "'transformer.'" in err[0] and "model.layers.0" in err[0], err


@pytest.mark.parametrize(
    ("method", "needle"),
    [("gptq", "GPTQ"), ("bnb4", "bitsandbytes 4-bit"), ("bnb8", "bitsandbytes 8-bit"), ("config", "awq")],
)
@pytest.mark.parametrize("where", ["base", "expert"])
def test_quantized_checkpoints_are_refused_before_anything_is_written(tmp_path, capsys, method, needle, where):
    base, experts = make_family(tmp_path, "mistral", num_experts=2)
    target = base if where == "base" else experts[1]
    if method == "config":
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "awq", "bits": 4}
        (target / "config.json").write_text(json.dumps(config))
    else:
        quantize_like(target, method)
    out = tmp_path / "out"
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS))
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and needle in err[0] and "unquantized" in err[0]
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_changed_embedding_and_norm_are_reported(tmp_path, capsys):
    base, experts = make_family(tmp_path, "mistral", num_experts=2)
    save_tokenizer(base, template=PLAIN)
    state = load_file(experts[1] / "model.safetensors")
    generator = torch.Generator().manual_seed(4)
    state[EMBED] = state[EMBED] + 0.01 * torch.randn(state[EMBED].shape, generator=generator)
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    save_file(state, experts[1] / "model.safetensors", metadata={"format": "pt"})
    base_state = load_file(base / "model.safetensors")
    want = {
        name: ((state[name].double() - base_state[name].double()).norm() / base_state[name].double().norm()).item()
        for name in (EMBED, "model.norm.weight")
    }
    argv = [str(a) for a in upscale_argv(base, experts, tmp_path / "out", *RANKS)]
    from smile_cli.cli import run

    capsys.readouterr()
    assert run([*argv, "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    found = json.loads(captured.out)["kept_differences"]
    assert {d["tensor"] for d in found} == set(want) and {d["expert"] for d in found} == {1}
    for d in found:
        assert math.isclose(d["relative_difference"], want[d["tensor"]], rel_tol=1e-4)
    assert "2 non-upscaled tensor(s) differ" in captured.err
    assert run([*argv, "--dry-run"]) == 0
    assert "model.norm.weight" in capsys.readouterr().out
    assert run([*argv, "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{experts[1]}: model.norm.weight (50% of the base's norm)" in card
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[EMBED], base_state[EMBED])  # the base's
    chat_and_generate(*load(tmp_path / "out"))


def test_model_card_metadata_names_hub_inputs_and_their_license(tmp_path, mistral_family):
    base, experts = mistral_family
    hf_home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repos = [("org--tiny-base", base), ("org--tiny-math", experts[0]), ("other--tiny-chat", experts[1])]
    for repo, folder in repos:
        snapshot = hf_home / "hub" / f"models--{repo}" / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        (snapshot / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "smile_cli", "upscale", "--base", "org/tiny-base", *RANKS, "-q"]
    hub_experts = "org/tiny-math,other/tiny-chat@main"
    result = subprocess.run([*command, "--experts", hub_experts, "--out", str(tmp_path / "a")], env=env)
    assert result.returncode == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == ["org/tiny-base", "org/tiny-math", "other/tiny-chat"]
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"merge", "moe", "smile"} <= set(meta["tags"])
    # a local expert without a license: no license claimed, local folders are not Hub ids
    result = subprocess.run(
        [*command, "--experts", f"org/tiny-math,{experts[2]}", "--out", str(tmp_path / "b")], env=env
    )
    assert result.returncode == 0
    meta = yaml.safe_load((tmp_path / "b" / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == ["org/tiny-base", "org/tiny-math"] and "license" not in meta


def test_resume_refuses_a_staging_folder_of_another_vocabulary():
    from smile_cli.staging import describe_changes

    head = {"version": "1", "options": {}, "inputs": [], "vocabulary": {"new_tokens": {"<|im_start|>": 96}}}
    assert describe_changes(head, {**head, "vocabulary": {"new_tokens": {"<x>": 96}}}) == [
        "the output's vocabulary differs (an input's tokenizer changed)"
    ]
    assert describe_changes(head, dict(head)) == []
