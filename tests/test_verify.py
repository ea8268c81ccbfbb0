"""`smile verify` passes a sound output and lists each kind of damage."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import smile, upscale
from smile_cli.cli import run


@pytest.fixture(scope="module")
def sound_output(tmp_path_factory, mistral_family):
    base, experts = mistral_family
    out = tmp_path_factory.mktemp("verify") / "out"
    options = ("--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "20KB", "--quiet")
    assert upscale(base, experts, out, *options) == 0
    return out


def test_sound_output_passes(sound_output, capsys):
    assert smile(capsys, "verify", sound_output)[0] == 0
    assert run(["verify", str(sound_output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and "forward pass" in report["checks"] and not report["defects"]


def _flip_byte(folder):
    path = folder / "model-00002-of-00009.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _delete_shard(folder):
    (folder / "model-00003-of-00009.safetensors").unlink()


def _edit_rank(folder):
    config = json.loads((folder / "config.json").read_text())
    config["rank_of_expert"] = 3
    (folder / "config.json").write_text(json.dumps(config))


def _modify_modeling(folder):
    with open(folder / "modeling_smile.py", "a") as f:
        f.write("\n# edited\n")


def _drop_from_index(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.1.mlp.up_proj.experts_u")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


DAMAGE = [
    (_flip_byte, "model-00002-of-00009.safetensors: SHA-256 does not match"),
    (_delete_shard, "model-00003-of-00009.safetensors: missing"),
    (_edit_rank, "rank_of_expert"),
    (_modify_modeling, "modeling_smile.py: differs"),
    (_drop_from_index, "'model.layers.1.mlp.up_proj.experts_u' in model-"),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_damage_is_reported(sound_output, tmp_path, capsys, damage, expected):
    folder = shutil.copytree(sound_output, tmp_path / "damaged")
    assert len(list(folder.glob("*.safetensors"))) == 9
    damage(folder)
    code, err = smile(capsys, "verify", folder)
    assert code == 1
    assert err and all(line.startswith("defect: ") for line in err), err
    assert any(expected in line for line in err), err
    assert run(["verify", str(folder), "--json", "--no-load"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and any(expected in d for d in report["defects"])


def test_missing_folder_is_bad_input(tmp_path, capsys):
    code, err = smile(capsys, "verify", tmp_path / "nothing")
    assert code == 2 and len(err) == 1 and "nothing" in err[0]
