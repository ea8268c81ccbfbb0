"""The command line and the output folder: formats, options, plan, errors that name the culprit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import upscale, upscale_argv
from smile_cli.cli import run
from tiny_models import make_base, make_expert, make_family, tiny_config


def experts_arg(experts):
    return ",".join(map(str, experts))


def imported_modules(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def read_all(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def test_sharded_and_single_file_outputs_hold_the_same_tensors(tmp_path, mistral_family):
    base, experts = mistral_family
    assert upscale(base, experts, tmp_path / "single", "--router-rank", "2", "--expert-rank", "4", "-q") == 0
    assert (
        upscale(
            base,
            experts,
            tmp_path / "sharded",
            "--router-rank",
            "2",
            "--expert-rank",
            "4",
            "-q",
            "--max-shard-size",
            "20KB",
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "single").glob("*.safetensors")) == ["model.safetensors"]
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # every shard respects the limit unless it holds a single larger tensor
        assert (tmp_path / "sharded" / shard).stat().st_size < 20_000 + 4096
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    single, sharded = read_all(tmp_path / "single"), read_all(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(sharded) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sharded.values())
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name
    assert not list(tmp_path.glob(".*staging*"))


def test_output_folder_contents(tmp_path, mistral_family):
    base, experts = mistral_family
    (base / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    try:
        out = tmp_path / "out"
        assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "-q") == 0
    finally:
        (base / "tokenizer.json").unlink()
        (base / "chat_template.jinja").unlink()
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "configuration_smile.py",
        "modeling_smile.py",
        "README.md",
        "smile_config.yaml",
        "smile_manifest.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "model.safetensors",
    } <= names
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "smile_mistral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 1)
    assert (config["rank_of_router"], config["rank_of_expert"]) == (2, 4)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_smile.SmileMistralForCausalLM"
    # self-contained: the modeling files import nothing from this package
    for name in ("modeling_smile.py", "configuration_smile.py"):
        third_party = imported_modules(out / name) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "huggingface_hub", "."}
    card = (out / "README.md").read_text()
    assert str(base) in card and "trust_remote_code=True" in card


def test_dtype_option_and_auto(tmp_path):
    base, experts = make_family(tmp_path, "mistral", num_experts=2, dtype=torch.bfloat16)
    assert upscale(base, experts, tmp_path / "auto", "--router-rank", "2", "--expert-rank", "4", "-q") == 0
    assert (
        upscale(base, experts, tmp_path / "f32", "--router-rank", "2", "--expert-rank", "4", "-q", "--dtype", "float32")
        == 0
    )
    auto, f32 = read_all(tmp_path / "auto"), read_all(tmp_path / "f32")
    name = "model.layers.0.mlp.up_proj"
    assert auto[name + ".experts_u"].dtype == torch.bfloat16 and f32[name + ".experts_u"].dtype == torch.float32
    assert auto[name + ".router.weight"].dtype == torch.float32  # routers always float32
    assert auto["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"


def test_yaml_config_and_flags_override_it(tmp_path, mistral_family):
    base, experts = mistral_family
    config = tmp_path / "job.yaml"
    config.write_text(
        f"base: {base}\nexperts:\n"
        + "".join(f"  - {e}\n" for e in experts)
        + "router_rank: 3\nexpert_rank: 5\ntop_k: 2\n"
    )
    out = tmp_path / "out"
    assert run(["upscale", "--config", str(config), "--out", str(out), "--expert-rank", "6", "-q"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["rank_of_router"], written["rank_of_expert"], written["num_experts_per_tok"]) == (3, 6, 2)
    import yaml

    effective = yaml.safe_load((out / "smile_config.yaml").read_text())
    assert effective["expert_rank"] == 6 and effective["experts"] == [str(e) for e in experts]


def test_bad_yaml_key_is_an_input_error(tmp_path, mistral_family, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("base: x\nexperts: [y]\nrouter_rnak: 3\n")
    assert run(["upscale", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "router_rnak" in capsys.readouterr().err


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    out = tmp_path / "out"
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--dry-run", "--json") == 0
    assert not out.exists() and not list(tmp_path.iterdir())
    plan = json.loads(capsys.readouterr().out)
    assert plan["upscaled_linears"] == 14  # 7 projections x 2 layers
    # parameter count from the formula in smile-method.md: router T*gk*in + experts T*(out*k + k*in)
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
    added = 2 * sum(3 * 2 * i + 3 * (o * 4 + 4 * i) for o, i in shapes)
    assert plan["params"] - plan["base_params"] == added
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--dry-run") == 0
    assert "peak memory" in capsys.readouterr().out


def test_json_summary_on_stdout_only(tmp_path, mistral_family):
    base, experts = mistral_family
    argv = upscale_argv(base, experts, tmp_path / "out", "--router-rank", "2", "--expert-rank", "4", "--json")
    result = subprocess.run(
        [sys.executable, "-m", "smile_cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(tmp_path / "out") and summary["files"] == ["model.safetensors"]
    assert summary["params"] > summary["base_params"]


def test_hub_id_through_offline_cache(tmp_path, mistral_family):
    """A Hub id resolves from a pre-populated cache with HF_HUB_OFFLINE=1; an uncached one is refused."""
    base, experts = mistral_family
    hf_home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, folder in [("org--tiny-base", base), ("org--tiny-math", experts[0])]:
        repo_dir = hf_home / "hub" / f"models--{repo}"
        shutil.copytree(folder, repo_dir / "snapshots" / commit)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "smile_cli",
        "upscale",
        "--base",
        "org/tiny-base",
        "--experts",
        f"org/tiny-math,{experts[1]}",
        "--router-rank",
        "2",
        "--expert-rank",
        "4",
        "--json",
    ]
    result = subprocess.run([*command, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "smile_manifest.json").read_text())
    assert manifest["inputs"][0]["revision"] == commit
    command[command.index("--experts") + 1] = "org/not-cached"
    result = subprocess.run([*command, "--out", str(tmp_path / "out2")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "org/not-cached" in result.stderr and "offline" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_vocab_mismatch_is_a_warning_and_embeddings_come_from_the_base(tmp_path, capsys):
    base = make_base(tmp_path / "base", tiny_config("mistral"))
    bigger = make_base(tmp_path / "big", tiny_config("mistral", vocab_size=98), seed=5)
    # the expert shares the base's decoder weights but has two more tokens
    from safetensors.torch import load_file, save_file

    state = load_file(base / "model.safetensors")
    big_state = load_file(bigger / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = big_state[key]
    save_file(state, bigger / "model.safetensors", metadata={"format": "pt"})
    other = make_expert(base, tmp_path / "other", seed=9)
    out = tmp_path / "out"
    assert upscale(base, [bigger, other], out, "--router-rank", "2", "--expert-rank", "4") == 0
    assert "vocabulary of 98 tokens" in capsys.readouterr().err
    assert read_all(out)["model.embed_tokens.weight"].shape == (96, 32)


def _corrupt(tmp_path, mistral_family, edit):
    base, experts = mistral_family
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    edit(bad)
    return base, [experts[0], bad, experts[2]]


def _edit_tensor(key, value):
    def edit(folder):
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        if value is None:
            del state[key]
        else:
            state[key] = value
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def _edit_config(key, value):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_edit_config("num_hidden_layers", 3), "num_hidden_layers"),
        (_edit_config("intermediate_size", 64), "intermediate_size"),
        (_edit_tensor("model.layers.1.mlp.down_proj.weight", None), "model.layers.1.mlp.down_proj.weight"),
        (
            _edit_tensor("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)),
            "model.layers.0.self_attn.k_proj.weight",
        ),
        (
            _edit_tensor("model.layers.0.mlp.up_proj.weight", torch.full((48, 32), float("nan"))),
            "model.layers.0.mlp.up_proj.weight",
        ),
    ],
    ids=["layers", "intermediate", "missing-tensor", "shape", "nan"],
)
def test_invalid_expert_exits_2_naming_model_and_tensor(tmp_path, mistral_family, capsys, edit, needle):
    base, experts = _corrupt(tmp_path, mistral_family, edit)
    out = tmp_path / "out"
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1  # one line naming the model and the tensor
    assert needle in errors[0] and str(experts[1]) in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--router-rank", "0"], "--router-rank"),
        (["--expert-rank", "17"], "--expert-rank"),
        (["--top-k", "4"], "--top-k"),
        (["--dtype", "int8"], "dtype"),
        (["--max-shard-size", "lots"], "max_shard_size"),
    ],
)
def test_bad_options_exit_2(tmp_path, mistral_family, capsys, extra, needle):
    base, experts = mistral_family
    assert upscale(base, experts, tmp_path / "out", *extra) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickle_only_checkpoint_is_refused(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(experts[0] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert upscale(base, [pickled], tmp_path / "out") == 2
    assert "pickle" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4") == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    # --force replaces only smile's own outputs (issue 25): a folder of the user's is refused, and kept
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--force", "-q") == 2
    assert "--force replaces only" in capsys.readouterr().err and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert upscale(base, experts[:2], out, "--router-rank", "2", "--expert-rank", "4", "-q") == 0
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "-q") == 2
    assert "--force" in capsys.readouterr().err
    assert upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--force", "-q") == 0
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == len(experts)


def test_help_lists_exit_codes():
    result = subprocess.run([sys.executable, "-m", "smile_cli", "upscale", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "130" in result.stdout and "Exit codes" in result.stdout


@pytest.mark.parametrize("command", ["upscale", "inspect"])
def test_help_shows_every_shared_option_in_full(command):
    """The options upscale and inspect share are declared once; bracketed text in help is shown, not parsed."""
    env = {**os.environ, "COLUMNS": "400"}
    argv = [sys.executable, "-m", "smile_cli", command, "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag in ["--experts", "--router-rank", "--expert-rank", "--budget", "--svd", "--device", "--target",
                 "--config", "--allow-pickle", "--trust-remote-code", "--quiet", "--json"]:  # fmt: skip
        assert flag in text, flag
    assert "org/name[@revision]" in text and "[auto = randomized where the rank" in text


def test_config_without_architectures_picks_the_class_that_matches_the_tensors(tmp_path, mistral_family):
    base, experts = mistral_family
    copies = []
    for folder in [base, *experts]:
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        del config["architectures"]
        (copy / "config.json").write_text(json.dumps(config))
        copies.append(copy)
    out = tmp_path / "out"
    assert upscale(copies[0], copies[1:], out, "--router-rank", "2", "--expert-rank", "4", "-q") == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["SmileMistralForCausalLM"]


def test_missing_base_names_the_flag(capsys):
    assert run(["upscale", "--experts", "a/b", "--out", "x"]) == 2
    assert "--base is required" in capsys.readouterr().err
