"""Hostile and careless inputs, round two (issue 25), for every command: foreign code planted in a folder never runs
(one gate, trust.check_own_code), --force and assemble never delete a folder smile cannot recognise as its own,
inputs that are not regular files are refused without being opened, and every bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import copy_model, edit_config, folder_hashes, shard_model, smile, staging_of, upscale_argv, upscaled

RANKS = ("--router-rank", "2", "--expert-rank", "4")
MODELING = "modeling_smile.py"


@pytest.fixture(scope="module")
def output(tmp_path_factory, char_family):
    """A SMILE output of the tiny Llama family with a tokenizer (route reads prompts with it); copied per test."""
    return upscaled(*char_family, tmp_path_factory.mktemp("hostile") / "out", *RANKS, "--quiet")


def planted(code: str, marker: Path) -> str:
    """Python that writes marker when imported, then does what `code` does."""
    return f"open({str(marker)!r}, 'w').write('ran')\n" + code


def tamper_modeling(folder: Path, marker: Path) -> None:
    (folder / MODELING).write_text(planted((folder / MODELING).read_text(), marker))


def plant_other_module(folder: Path, marker: Path) -> None:
    """A copy of the modeling code under another name that writes the marker, and config.json's auto_map at it."""
    (folder / "evil_smile.py").write_text(planted((folder / MODELING).read_text(), marker))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil_smile.SmileLlamaForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))


def point_at_other_repository(folder: Path, marker: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "someone/else--modeling_smile.SmileLlamaForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))


def plant_tokenizer_code(folder: Path, marker: Path) -> None:
    """A custom tokenizer class (auto_map in tokenizer_config.json) whose module writes the marker when imported."""
    (folder / "tokenization_evil.py").write_text(
        planted(
            "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
            "    pass\n",
            marker,
        )
    )
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer"
    )
    path.write_text(json.dumps(config))


PLANTS = [tamper_modeling, plant_other_module, point_at_other_repository, plant_tokenizer_code]
CULPRIT = {
    tamper_modeling: MODELING,
    plant_other_module: "evil_smile",
    point_at_other_repository: "someone/else--",
    plant_tokenizer_code: "tokenization_evil",
}


@pytest.mark.parametrize("plant", PLANTS, ids=[p.__name__ for p in PLANTS])
def test_foreign_code_never_runs_in_any_command(plant, tmp_path, output, capsys):
    folder = copy_model(output, tmp_path / "model")
    marker = tmp_path / "pwned"
    plant(folder, marker)
    commands = (["route", folder, "--prompt", "abc"], ["export", folder, tmp_path / "lora", "--expert", "0"])
    for argv in (*commands, ["serve", folder]):  # serve: vLLM would run the folder's code
        code, err = smile(capsys, *argv)
        assert code == 2 and len(err) == 1 and CULPRIT[plant] in err[0], (argv[0], err)
        assert not marker.exists(), argv[0]
    assert not (tmp_path / "lora").exists()
    code, err = smile(capsys, "verify", folder)  # verify reports it as a defect, and loads nothing
    assert code == 1 and any(line.startswith("defect:") and CULPRIT[plant] in line for line in err), err
    assert not marker.exists()


def test_the_gate_names_the_file_and_accepts_the_tools_own(tmp_path, output):
    from smile_cli.errors import InputError
    from smile_cli.trust import check_own_code, foreign_code

    assert foreign_code(output) == []
    check_own_code(output)
    folder = copy_model(output, tmp_path / "model")
    (folder / "notes.py").write_text("# a user's script\n")
    with pytest.raises(InputError, match="notes.py"):
        check_own_code(folder)
    (folder / "notes.py").unlink()
    (folder / "configuration_smile.py").unlink()
    assert foreign_code(folder) == ["configuration_smile.py: missing"]
    os.mkfifo(folder / "configuration_smile.py")
    assert "FIFO" in foreign_code(folder)[0]


def test_assemble_refuses_a_file_planted_in_staging(tmp_path, char_family, capsys):
    base, experts = char_family
    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        argv = upscale_argv(base, experts, out, *RANKS, "--max-shard-size", "8KB", "--shard", part, "--quiet")
        assert smile(capsys, *argv)[0] == 0
    staging = staging_of(out)
    marker = tmp_path / "pwned"
    (staging / "evil_smile.py").write_text(planted("", marker))
    code, err = smile(capsys, "assemble", out)
    assert code == 2 and len(err) == 1 and "evil_smile.py" in err[0], err
    assert not out.exists() and not marker.exists()
    (staging / "evil_smile.py").unlink()
    assert smile(capsys, "assemble", out, "--quiet")[0] == 0
    assert smile(capsys, "verify", out, "--no-load")[0] == 0


# ---- tokenizer code in an input ---------------------------------------------------------------------------------


def test_tokenizer_code_in_an_input_is_refused_and_never_carried(tmp_path, char_family, capsys):
    base, experts = char_family
    custom = copy_model(base, tmp_path / "custom_base")
    marker = tmp_path / "pwned"
    plant_tokenizer_code(custom, marker)
    out = tmp_path / "out"
    for command in (upscale_argv(custom, experts, out, *RANKS), ["inspect", custom, "--experts", experts[0], *RANKS]):
        code, err = smile(capsys, *command, "--quiet")
        assert code == 2 and len(err) == 1 and "tokenizer_config.json" in err[0] and "--trust-remote-code" in err[0]
    assert not out.exists() and not staging_of(out).exists()
    code, err = smile(capsys, *upscale_argv(custom, experts, out, *RANKS), "--trust-remote-code")
    assert code == 0 and any(line.startswith("warning:") and "tokenizer_config.json" in line for line in err), err
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "tokenization_evil.py").exists()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # as SMILE outputs are loaded
    assert tokenizer("abc")["input_ids"] == AutoTokenizer.from_pretrained(base)("abc")["input_ids"]
    assert smile(capsys, "verify", out)[0] == 0
    assert smile(capsys, "route", out, "--prompt", "abc")[0] == 0
    assert not marker.exists()
    # the output's other files are what they are without the custom tokenizer (the card, options and manifest name
    # the base's path)
    plain = upscaled(base, experts, tmp_path / "plain", *RANKS, "--quiet")
    differ = {n for n, h in folder_hashes(out).items() if folder_hashes(plain).get(n) != h}
    assert differ == {"tokenizer_config.json", "smile_manifest.json", "README.md", "smile_config.yaml"}, differ


# ---- --force and the output location ------------------------------------------------------------------------------


def home_like(folder: Path) -> dict[str, str]:
    """A folder like a home directory; returns its files' contents by relative path."""
    files = {".bashrc": "export PATH=...\n", ".ssh/config": "Host *\n", "documents/thesis.tex": "\\begin{document}\n"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def still_there(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


def test_force_never_deletes_a_folder_that_is_not_smiles(tmp_path, char_family, capsys, monkeypatch):
    base, experts = char_family
    home = tmp_path / "home"
    home.mkdir()
    files = home_like(home)
    monkeypatch.setenv("HOME", str(home))
    for out in ("~", home):  # the tool expands ~
        code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--force", "--quiet")
        assert code == 2 and len(err) == 1 and str(home) in err[0] and "--force replaces only" in err[0], err
        assert still_there(home, files)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('train')\n")
    monkeypatch.chdir(project)
    code, err = smile(capsys, *upscale_argv(base, experts, ".", *RANKS), "--force", "--quiet")
    assert code == 2 and len(err) == 1 and (project / "train.py").read_text() == "print('train')\n", err
    assert not list(tmp_path.glob(".*smile-*"))


def test_a_users_folder_named_like_the_staging_folder_is_never_deleted(tmp_path, char_family, capsys):
    base, experts = char_family
    out = tmp_path / "out"
    staging = staging_of(out)
    staging.mkdir()
    (staging / "mine.txt").write_text("mine")
    for flags in ((), ("--force",), ("--resume",), ("--shard", "0/2"), ("--shard", "1/2", "--resume")):
        code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), *flags, "--quiet")
        assert code == 2 and len(err) == 1 and str(staging) in err[0], (flags, err)
        assert (staging / "mine.txt").read_text() == "mine" and not out.exists()
    code, err = smile(capsys, "assemble", out)
    assert code == 2 and len(err) == 1 and (staging / "mine.txt").exists(), err


def test_force_replaces_smiles_own_output_and_an_empty_folder(tmp_path, char_family, capsys):
    base, experts = char_family
    out = tmp_path / "out"
    out.mkdir()
    assert smile(capsys, *upscale_argv(base, experts[:2], out, *RANKS), "--quiet")[0] == 0  # an empty folder
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 2 and "--force" in err[0]
    assert smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--force", "--quiet")[0] == 0
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3


def test_assemble_never_deletes_user_files_in_out(tmp_path, char_family, capsys):
    base, experts = char_family
    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        argv = upscale_argv(base, experts, out, *RANKS, "--max-shard-size", "8KB", "--shard", part, "--quiet")
        assert smile(capsys, *argv)[0] == 0
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ((), ("--force",)):
        code, err = smile(capsys, "assemble", out, *flags)
        assert code == 2 and len(err) == 1 and str(out) in err[0], err
        assert (out / "notes.txt").read_text() == "mine" and staging_of(out).is_dir()
    (out / "notes.txt").unlink()
    assert smile(capsys, "assemble", out, "--quiet")[0] == 0  # an empty folder is fine
    assert smile(capsys, "verify", out, "--no-load")[0] == 0


def test_export_never_deletes_user_files(tmp_path, output, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ((), ("--force",)):
        code, err = smile(capsys, "export", output, out, "--expert", "0", *flags)
        assert code == 2 and len(err) == 1 and str(out) in err[0] and (out / "notes.txt").exists(), err
    (out / "notes.txt").unlink()
    assert smile(capsys, "export", output, out, "--expert", "0", "--quiet")[0] == 0
    code, err = smile(capsys, "export", output, out, "--expert", "1", "--force", "--quiet")  # its own export
    assert code == 0, err
    assert json.loads((out / "smile_manifest.json").read_text())["export"] == {"expert": 1, "kind": "lora"}
    (out / "smile_manifest.json").unlink()  # as exports were before they held a manifest: known by their card
    assert smile(capsys, "export", output, out, "--expert", "0", "--force", "--quiet")[0] == 0
    staging = tmp_path / ".other.smile-export"
    staging.mkdir()
    (staging / "mine.txt").write_text("mine")
    code, err = smile(capsys, "export", output, tmp_path / "other", "--expert", "0", "--force")
    assert code == 2 and len(err) == 1 and str(staging) in err[0] and (staging / "mine.txt").exists(), err


def test_output_that_is_a_symlink_loop_or_a_link(tmp_path, char_family, capsys):
    base, experts = char_family
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, err = smile(capsys, *upscale_argv(base, experts, loop, *RANKS), "--quiet")
    assert code == 2 and len(err) == 1 and "symbolic link loop" in err[0], err
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    code, err = smile(capsys, *upscale_argv(base, experts, tmp_path / "link", *RANKS), "--force", "--quiet")
    assert code == 2 and len(err) == 1 and "symbolic link" in err[0], err
    assert not list(tmp_path.glob(".*smile-*"))


# ---- inputs that are not regular files ---------------------------------------------------------------------------


def run_cli(*argv, timeout=120) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (a hang fails the test instead of the suite)."""
    command = [sys.executable, "-m", "smile_cli", *map(str, argv)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def fifo_weights(tmp_path, char_family, output):
    expert = copy_model(char_family[1][0], tmp_path / "fifo_expert")
    (expert / "model.safetensors").unlink()
    os.mkfifo(expert / "model.safetensors")
    return upscale_argv(char_family[0], [expert, char_family[1][1]], tmp_path / "out", *RANKS), "FIFO"


def fifo_config(tmp_path, char_family, output):
    base = copy_model(char_family[0], tmp_path / "fifo_base")
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    return upscale_argv(base, char_family[1], tmp_path / "out", *RANKS), "FIFO"


def fifo_tokenizer(tmp_path, char_family, output):
    base = copy_model(char_family[0], tmp_path / "fifo_base")
    (base / "tokenizer.json").unlink()
    os.mkfifo(base / "tokenizer.json")
    return ["inspect", base, "--experts", char_family[1][0], *RANKS], "FIFO"


def folder_as_shard(tmp_path, char_family, output):
    expert = copy_model(char_family[1][0], tmp_path / "dir_expert")
    (expert / "model.safetensors").unlink()
    (expert / "model.safetensors").mkdir()
    return upscale_argv(char_family[0], [expert], tmp_path / "out", *RANKS), "folder"


def symlink_loop_shard(tmp_path, char_family, output):
    expert = copy_model(char_family[1][0], tmp_path / "loop_expert")
    (expert / "model.safetensors").unlink()
    (expert / "model.safetensors").symlink_to(expert / "model.safetensors")
    return upscale_argv(char_family[0], [expert], tmp_path / "out", *RANKS), "symbolic link loop"


def device_as_shard(tmp_path, char_family, output):
    expert = copy_model(char_family[1][0], tmp_path / "dev_expert")
    (expert / "model.safetensors").unlink()
    (expert / "model.safetensors").symlink_to("/dev/zero")
    return upscale_argv(char_family[0], [expert], tmp_path / "out", *RANKS), "device"


def fifo_in_output_for_route(tmp_path, char_family, output):
    folder = copy_model(output, tmp_path / "model")
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    return ["route", folder, "--prompt", "abc"], "FIFO"


def fifo_in_output_for_verify(tmp_path, char_family, output):
    folder = copy_model(output, tmp_path / "model")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return ["verify", folder], "FIFO"


def fifo_in_output_for_export(tmp_path, char_family, output):
    folder = copy_model(output, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    return ["export", folder, tmp_path / "exported", "--expert", "0"], "FIFO"


SPECIAL = [
    fifo_weights,
    fifo_config,
    fifo_tokenizer,
    folder_as_shard,
    symlink_loop_shard,
    device_as_shard,
    fifo_in_output_for_route,
    fifo_in_output_for_verify,
    fifo_in_output_for_export,
]


@pytest.mark.parametrize("case", SPECIAL, ids=[c.__name__ for c in SPECIAL])
def test_inputs_that_are_not_regular_files_are_refused_without_opening(case, tmp_path, char_family, output):
    argv, culprit = case(tmp_path, char_family, output)
    result = run_cli(*argv, "--quiet" if argv[0] in ("upscale", "inspect", "export") else "--json")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and culprit in err[0], (result.returncode, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "exported").exists()


# ---- every error path: one line, exit 2 -------------------------------------------------------------------------


def garbage_config(folder: Path) -> str:
    (folder / "config.json").write_text("{garbage")
    return "config.json"


def missing_shard(folder: Path) -> str:
    shards = shard_model(folder)
    (folder / shards[1]).unlink()
    return shards[1]


def garbage_index(folder: Path) -> str:
    shard_model(folder)
    (folder / "model.safetensors.index.json").write_text("[[[")
    return "model.safetensors.index.json"


def garbage_header(folder: Path) -> str:
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[8:20] = b"#garbage####"
    (folder / "model.safetensors").write_bytes(bytes(raw))
    return "model.safetensors"


def architectures_not_a_list(folder: Path) -> str:
    edit_config(folder, architectures="SmileLlamaForCausalLM")
    return "architectures"


def tensor_shapes_unlike_config(folder: Path) -> str:
    edit_config(folder, hidden_size=16)
    return "does not load"


DAMAGE = [garbage_config, missing_shard, garbage_index, garbage_header, architectures_not_a_list]


@pytest.mark.parametrize("damage", [*DAMAGE, tensor_shapes_unlike_config], ids=lambda d: d.__name__)
def test_route_on_a_damaged_folder_is_one_line_and_exit_2(damage, tmp_path, output, capsys):
    folder = copy_model(output, tmp_path / "model")
    culprit = damage(folder)
    code, err = smile(capsys, "route", folder, "--prompt", "abc")
    assert code == 2 and len(err) == 1 and culprit in err[0], err


@pytest.mark.parametrize("damage", DAMAGE[:4], ids=lambda d: d.__name__)
def test_export_on_a_damaged_folder_is_one_line_and_exit_2(damage, tmp_path, output, capsys):
    folder = copy_model(output, tmp_path / "model")
    culprit = damage(folder)
    code, err = smile(capsys, "export", folder, tmp_path / "exported", "--expert", "0", "--as", "dense")
    assert code == 2 and len(err) == 1 and culprit in err[0], err
    assert not (tmp_path / "exported").exists() and not (tmp_path / ".exported.smile-export").exists()


@pytest.mark.parametrize("damage", DAMAGE[:4], ids=lambda d: d.__name__)
def test_verify_on_a_damaged_folder_reports_a_defect(damage, tmp_path, output, capsys):
    folder = copy_model(output, tmp_path / "model")
    culprit = damage(folder)
    code, err = smile(capsys, "verify", folder)
    assert code == 1 and err and all(line.startswith("defect:") for line in err) and culprit in "\n".join(err), err


def test_verify_on_a_malformed_manifest_reports_a_defect(tmp_path, output, capsys):
    folder = copy_model(output, tmp_path / "model")
    manifest = json.loads((folder / "smile_manifest.json").read_text())
    (folder / "smile_manifest.json").write_text(json.dumps({**manifest, "shards": ["x", 3]}))
    code, err = smile(capsys, "verify", folder, "--no-load")
    assert code == 1 and any("smile_manifest.json" in line for line in err), err
    (folder / "smile_manifest.json").write_text(
        json.dumps(
            {**manifest, "shards": [{"name": "/etc/hostname"}], "options": {**manifest["options"], "experts": 3}}
        )
    )
    code, err = smile(capsys, "verify", folder, "--no-load")
    assert code == 1 and any("outside the folder" in line for line in err), err


def parts(tmp_path, char_family, capsys) -> Path:
    base, experts = char_family
    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        argv = upscale_argv(base, experts, out, *RANKS, "--max-shard-size", "8KB", "--shard", part, "--quiet")
        assert smile(capsys, *argv)[0] == 0
    return out


def record_not_json(staging: Path) -> str:
    record = sorted(staging.glob(".smile-part-*.json"))[0]
    record.write_text("{garbage")
    return record.name


def record_fields_malformed(staging: Path) -> str:
    record = sorted(staging.glob(".smile-part-*.json"))[1]
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "shards": [{"name": 3}]}))
    return record.name


def record_options_malformed(staging: Path) -> str:
    for record in staging.glob(".smile-part-*.json"):
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "options": {**data["options"], "top_k": "many"}}))
    return "options"


def shard_of_a_part_missing(staging: Path) -> str:
    shard = sorted(staging.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return shard.name


@pytest.mark.parametrize(
    "damage",
    [record_not_json, record_fields_malformed, record_options_malformed, shard_of_a_part_missing],
    ids=lambda d: d.__name__,
)
def test_assemble_of_damaged_parts_is_one_line_and_exit_2(damage, tmp_path, char_family, capsys):
    out = parts(tmp_path, char_family, capsys)
    culprit = damage(staging_of(out))
    code, err = smile(capsys, "assemble", out)
    assert code == 2 and len(err) == 1 and culprit in err[0], err
    assert not out.exists()


def test_resume_on_a_users_folder_named_like_staging_deletes_nothing(tmp_path, char_family, capsys):
    base, experts = char_family
    out = tmp_path / "out"
    staging = staging_of(out)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"not mine to delete")
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--resume", "--quiet")
    assert code == 2 and (staging / "model.safetensors").read_bytes() == b"not mine to delete", err


def test_loading_the_output_still_works_after_all_checks(output):
    """The gate accepts what upscale writes: the output loads and runs as users load it."""
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
