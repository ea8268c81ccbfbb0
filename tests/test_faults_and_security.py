"""Faults mid-run (disk full, Ctrl-C), resume, determinism, warnings, security, and header fuzzing."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL, copy_model, edit_config, folder_hashes, smile, staging_of, upscale, upscale_argv
from reference import reference_model
from smile_cli.errors import InputError
from smile_cli.inputs.safetensors_format import read_safetensors_header

RANKS = ["--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "8KB"]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, mistral_family):
    """Hashes of an uninterrupted run's output with RANKS."""
    base, experts = mistral_family
    out = tmp_path_factory.mktemp("clean") / "out"
    assert upscale(base, experts, out, *RANKS, "--quiet") == 0
    hashes = folder_hashes(out)
    assert sum(name.endswith(".safetensors") for name in hashes) > 4  # several shards
    return hashes


class FullDisk:
    """A file object that takes `room` bytes, then fails like a full disk."""

    def __init__(self, file, room: list[int]):
        self.file, self.room, self.name = file, room, file.name

    def write(self, data):
        n = memoryview(data).nbytes
        if self.room[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= n
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_disk_full_mid_write_fails_cleanly_then_resumes(tmp_path, mistral_family, clean_run, capsys, monkeypatch):
    from smile_cli import writer

    base, experts = mistral_family
    out = tmp_path / "out"
    room = [40_000]
    original_open = writer.ShardedWriter._open

    def open_on_small_disk(self, shard):
        original_open(self, shard)
        self.file = FullDisk(self.file, room)

    monkeypatch.setattr(writer.ShardedWriter, "_open", open_on_small_disk)
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    staging = staging_of(out)
    assert not out.exists() and staging.is_dir()
    assert not list(staging.glob("*.partial"))  # the shard being written is gone; complete ones are kept
    kept = list(staging.glob("*.safetensors"))
    assert kept
    monkeypatch.setattr(writer.ShardedWriter, "_open", original_open)
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--resume")
    assert code == 0, err
    assert any(f"{len(kept)} of" in line for line in err)  # the complete shards were kept, not recomputed
    assert folder_hashes(out) == clean_run and not staging.exists()


def test_ctrl_c_keeps_staging_for_resume(tmp_path, mistral_family, clean_run, capsys, monkeypatch):
    from smile_cli import staging as staging_module

    base, experts = mistral_family
    out = tmp_path / "out"
    original_add = staging_module.Journal.add
    calls = []

    def add_then_interrupt(self, shard):
        original_add(self, shard)
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(staging_module.Journal, "add", add_then_interrupt)
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 130 and len(err) == 1 and "interrupted" in err[0] and "--resume" in err[0], err
    assert not out.exists() and staging_of(out).is_dir()
    monkeypatch.setattr(staging_module.Journal, "add", original_add)
    # a plain rerun does not silently discard the interrupted work
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--quiet")
    assert code == 2 and len(err) == 1 and "--resume" in err[0]
    # resuming with other options is refused and says what changed
    other = ["--router-rank", "2", "--expert-rank", "3", "--max-shard-size", "8KB"]
    code, err = smile(capsys, *upscale_argv(base, experts, out, *other), "--resume", "--quiet")
    assert code == 2 and len(err) == 1 and "expert_rank 4 -> 3" in err[0], err
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--resume", "--quiet")
    assert code == 0, err
    assert folder_hashes(out) == clean_run
    # resuming a run that already completed has nothing to do and succeeds
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--resume", "--quiet")
    assert code == 0 and folder_hashes(out) == clean_run


def test_failed_move_into_place_keeps_the_complete_model(tmp_path, mistral_family, clean_run, capsys, monkeypatch):
    base, experts = mistral_family
    out = tmp_path / "out"
    rename = Path.rename

    def refuse_staging(path, target):
        if path.name.endswith(".smile-staging"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", refuse_staging)
    code, err = smile(capsys, *upscale_argv(base, experts, out, *RANKS))
    assert code == 1 and "cannot move the finished model into place" in err[-1], err
    assert not out.exists()
    monkeypatch.undo()
    staging = staging_of(out)
    assert folder_hashes(staging) == clean_run  # complete, and the same files a successful run moves into place
    staging.rename(out)  # what the message tells the user to do
    assert smile(capsys, "verify", out)[0] == 0


def test_resume_refuses_changed_inputs(tmp_path, mistral_family, capsys, monkeypatch):
    from smile_cli import staging as staging_module

    base, experts = mistral_family
    expert = copy_model(experts[1], tmp_path / "expert")
    argv = upscale_argv(base, [experts[0], expert], tmp_path / "out", *RANKS, "--quiet")

    def interrupt(self, shard):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging_module.Journal, "add", interrupt)
    assert smile(capsys, *argv)[0] == 130
    monkeypatch.undo()
    weights = expert / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    code, err = smile(capsys, *argv, "--resume")
    assert code == 2 and len(err) == 1 and f"{expert}: model.safetensors changed (mtime_ns)" in err[0], err


def test_identical_runs_are_bitwise_identical(tmp_path, mistral_family, clean_run, capsys):
    base, experts = mistral_family
    out = tmp_path / "elsewhere" / "other_name"
    assert smile(capsys, *upscale_argv(base, experts, out, *RANKS), "--seed", "0", "--quiet")[0] == 0
    assert folder_hashes(out) == clean_run  # README.md included: its command line comes from the options
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert manifest["options"]["seed"] == 0 and manifest["version"]
    assert [s["name"] for s in manifest["shards"]] == sorted(n for n in clean_run if n.endswith(".safetensors"))
    assert all(f["head_sha256"] and f["mtime_ns"] for i in manifest["inputs"] for f in i["files"])


def test_expert_identical_to_base_warns_and_adds_nothing(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    twin = copy_model(base, tmp_path / "twin_of_base")
    out = tmp_path / "out"
    code, err = smile(
        capsys,
        *upscale_argv(base, [experts[0], twin], out, "--router-rank", "2", "--expert-rank", "4", "--svd", "exact"),
        *FAITHFUL,
    )
    assert code == 0
    assert any(line.startswith("warning:") and str(twin) in line and "zero" in line for line in err), err
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    # the twin's router rows are zero, so with top-1 every token goes to expert 0: the 1-expert model
    want = reference_model(base, [experts[0]], 2, 4, 1)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), want(ids).logits, rtol=1e-4, atol=1e-4)


def test_same_expert_twice_warns(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    argv = upscale_argv(base, [experts[0], experts[0]], tmp_path / "out", "--router-rank", "2", "--expert-rank", "4")
    code, err = smile(capsys, *argv)
    assert code == 0 and any("given twice" in line for line in err), err


def test_allow_pickle_reads_weights_only(tmp_path, mistral_family, clean_run, capsys):
    base, experts = mistral_family
    pickled = copy_model(experts[1], tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "out"
    argv = upscale_argv(base, [experts[0], pickled, experts[2]], out, *RANKS)
    assert smile(capsys, *argv, "--quiet")[0] == 2
    code, err = smile(capsys, *argv, "--allow-pickle")
    assert code == 0 and any("weights-only" in line for line in err), err
    got = folder_hashes(out)
    assert {n: h for n, h in got.items() if n.endswith(".safetensors")} == {
        n: h for n, h in clean_run.items() if n.endswith(".safetensors")
    }


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs_even_with_allow_pickle(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    evil = copy_model(experts[1], tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    state = {"model.embed_tokens.weight": torch.zeros(2), "payload": Exploit()}
    torch.save(state, evil / "pytorch_model.bin", pickle_module=pickle)
    code, err = smile(capsys, *upscale_argv(base, [experts[0], evil], tmp_path / "out"), "--allow-pickle", "--quiet")
    assert code == 2 and len(err) == 1 and "pytorch_model.bin" in err[0], err
    assert not marker.exists()


def test_custom_code_base_needs_trust_flag_and_its_code_never_runs(tmp_path, mistral_family, capsys):
    base, experts = mistral_family
    custom = copy_model(base, tmp_path / "custom")
    marker = tmp_path / "pwned"
    (custom / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    edit_config(custom, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    out = tmp_path / "out"
    argv = upscale_argv(custom, experts, out, "--router-rank", "2", "--expert-rank", "4")
    code, err = smile(capsys, *argv, "--quiet")
    assert code == 2 and "auto_map" in err[0]
    code, err = smile(capsys, *argv, "--trust-remote-code")
    assert code == 0 and any(line.startswith("warning:") and "custom model code" in line for line in err), err
    config = json.loads((out / "config.json").read_text())
    assert all(v.split(".")[0] in ("configuration_smile", "modeling_smile") for v in config["auto_map"].values())
    assert not (out / "modeling_evil.py").exists() and not marker.exists()


# ---- read_safetensors_header never raises anything but InputError -------------------------------------


def _check_header_bytes(tmp: Path, data: bytes) -> None:
    path = tmp / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors_header(path)
    except InputError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "I8", "BOOL", "F99", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 2**64), max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.sampled_from(["a", "b", "__metadata__", "w.weight"]), entries | json_values, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, body=st.binary(max_size=64), pad=st.integers(0, 9))
def test_fuzzed_structured_headers_raise_only_input_error(tmp_path, header, body, pad):
    raw = json.dumps(header).encode() + b" " * pad
    _check_header_bytes(tmp_path, struct.pack("<Q", len(raw)) + raw + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=200)
    | st.builds(lambda n, b: struct.pack("<Q", n) + b, st.integers(0, 2**64 - 1), st.binary(max_size=100))
    | st.builds(lambda d: struct.pack("<Q", 8 * d) + b"[" * 4 * d + b"]" * 4 * d, st.integers(1, 30000))
)
def test_fuzzed_raw_bytes_raise_only_input_error(tmp_path, data):
    _check_header_bytes(tmp_path, data)
