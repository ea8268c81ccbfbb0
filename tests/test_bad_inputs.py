"""Every bad input: exit code 2, ONE line on stderr naming the culprit, and no output folder (nor staging)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    copy_model,
    edit_config,
    edit_tensors,
    rewrite_header,
    shard_model,
    smile,
    staging_of,
    upscale_argv,
)

RANKS = ["--router-rank", "2", "--expert-rank", "4"]
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def _expert_copy(tmp, experts):
    return copy_model(experts[1], tmp / "bad_expert")


def missing_local_path(tmp, base, experts):
    return upscale_argv(tmp / "no_such_model", experts, tmp / "out", *RANKS), "no_such_model"


def unknown_hub_id(tmp, base, experts):
    return upscale_argv(base, [experts[0], "nobody-zz9/no-such-model"], tmp / "out", *RANKS), "nobody-zz9/no-such-model"


def hub_id_offline_not_cached(tmp, base, experts):
    return upscale_argv("mistralai/Mistral-7B-v0.1@main", experts, tmp / "out", *RANKS), "mistralai/Mistral-7B-v0.1"


def folder_without_config(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    (bad / "config.json").unlink()
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "config.json"


def pickle_only_weights(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    torch.save(load_file(bad / "model.safetensors"), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "pytorch_model.bin"


def truncated_safetensors(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    path = bad / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "truncated"


def corrupt_header(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    path = bad / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"#garbage####"
    path.write_bytes(bytes(raw))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), str(path)


def oversized_header(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    path = bad / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), str(path)


def offsets_outside_file(tmp, base, experts):
    bad = _expert_copy(tmp, experts)

    def push_last_past_end(header):
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 4096, end + 4096]

    rewrite_header(bad / "model.safetensors", push_last_past_end)
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "model.safetensors"


def index_names_missing_shard(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    shards = shard_model(bad)
    (bad / shards[1]).unlink()
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), shards[1]


def tensor_missing_from_its_shard(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    shards = shard_model(bad)
    index = bad / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"weight_map": {', f'"weight_map": {{"{WEIGHT}.ghost": "{shards[0]}", '))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), f"{WEIGHT}.ghost"


def architecture_mismatch(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    edit_config(bad, num_hidden_layers=3)
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "num_hidden_layers"


def wrong_shape(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    edit_tensors(bad, lambda s: s.__setitem__(WEIGHT, torch.zeros(32, 47)))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), WEIGHT


def tensor_missing_in_one_expert(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    edit_tensors(bad, lambda s: s.pop(WEIGHT))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), WEIGHT


def nan_in_weight(tmp, base, experts):  # found mid-run, after several tensors are written
    bad = _expert_copy(tmp, experts)
    edit_tensors(bad, lambda s: s[WEIGHT].__setitem__((3, 5), math.nan))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS, "--max-shard-size", "8KB"), WEIGHT


def inf_in_weight(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    edit_tensors(bad, lambda s: s[WEIGHT].__setitem__((0, 0), math.inf))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), WEIGHT


def router_rank_too_large(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", "--router-rank", "999"), "--router-rank"


def router_rank_zero(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", "--router-rank", "0"), "--router-rank"


def expert_rank_too_large(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", "--expert-rank", "33"), "--expert-rank"


def expert_rank_negative(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", "--expert-rank", "-3"), "expert-rank"


def top_k_too_large(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", *RANKS, "--top-k", "4"), "--top-k"


def no_experts(tmp, base, experts):
    return ["upscale", "--base", base, "--experts", ",", "--out", tmp / "out"], "experts"


def output_inside_input(tmp, base, experts):
    return upscale_argv(base, experts, experts[0] / "smile_out", *RANKS), "inside the input"


def file_where_parent_folder_should_be(tmp, base, experts):
    (tmp / "a_file").write_text("x")
    return upscale_argv(base, experts, tmp / "a_file" / "out", *RANKS), "a_file"


def base_with_custom_code(tmp, base, experts):
    bad = copy_model(base, tmp / "custom_base")
    edit_config(bad, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    return upscale_argv(bad, experts, tmp / "out", *RANKS), "auto_map"


def base_missing_projection(tmp, base, experts):
    bad = copy_model(base, tmp / "holey_base")
    edit_tensors(bad, lambda s: s.pop("model.layers.1.self_attn.o_proj.weight"))
    return upscale_argv(bad, experts, tmp / "out", *RANKS), "model.layers.1.self_attn.o_proj.weight"


def config_not_json(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    (bad / "config.json").write_text("{not json")
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), "config.json"


def integer_weight(tmp, base, experts):
    bad = _expert_copy(tmp, experts)
    edit_tensors(bad, lambda s: s.__setitem__(WEIGHT, s[WEIGHT].to(torch.int32)))
    return upscale_argv(base, [experts[0], bad], tmp / "out", *RANKS), WEIGHT


def bad_dtype_option(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", *RANKS, "--dtype", "int8"), "dtype"


def zero_shard_size(tmp, base, experts):
    return upscale_argv(base, experts, tmp / "out", *RANKS, "--max-shard-size", "0"), "max_shard_size"


def expert_is_a_file(tmp, base, experts):
    return upscale_argv(base, [experts[0], experts[1] / "config.json"], tmp / "out", *RANKS), "config.json"


CASES = [
    missing_local_path,
    unknown_hub_id,
    hub_id_offline_not_cached,
    folder_without_config,
    pickle_only_weights,
    truncated_safetensors,
    corrupt_header,
    oversized_header,
    offsets_outside_file,
    index_names_missing_shard,
    tensor_missing_from_its_shard,
    architecture_mismatch,
    wrong_shape,
    tensor_missing_in_one_expert,
    nan_in_weight,
    inf_in_weight,
    router_rank_too_large,
    router_rank_zero,
    expert_rank_too_large,
    expert_rank_negative,
    top_k_too_large,
    no_experts,
    output_inside_input,
    file_where_parent_folder_should_be,
    base_with_custom_code,
    base_missing_projection,
    config_not_json,
    integer_weight,
    bad_dtype_option,
    zero_shard_size,
    expert_is_a_file,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_refused_in_one_line(case, tmp_path, mistral_family, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, experts = mistral_family
    argv, culprit = case(tmp_path, base, experts)
    out = next(argv[i + 1] for i, a in enumerate(argv) if a == "--out")
    code, err = smile(capsys, *argv, "--quiet")
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and culprit in err[0], err
    assert not out.exists() and not staging_of(out).exists()


def test_non_empty_output_is_refused_and_left_alone(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 2 and len(err) == 1 and "not empty" in err[0] and str(out) in err[0]
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert not staging_of(out).exists()


def test_permission_denied_on_output_location(tmp_path, mistral_family, capsys, monkeypatch):
    from pathlib import Path

    base, experts = mistral_family
    out = tmp_path / "readonly" / "out"

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 2 and len(err) == 1 and "Permission denied" in err[0] and "readonly" in err[0], err
    assert not out.exists() and not staging_of(out).exists()
