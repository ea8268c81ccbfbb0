"""Upscale straight from the Hub: a Hub look-alike on 127.0.0.1 (hub_server.py) serves the tiny families, the CLI
runs in a subprocess with HF_ENDPOINT pointing at it (conftest sets HF_HUB_OFFLINE=1 for everything else)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import folder_hashes, shard_model, staging_of
from hub_server import HubServer
from peak_rss import PEAK_RSS_RUN, read_peak_rss
from synthetic_family import mistral_7b_config, write_family
from tiny_models import make_family

# one projection per layer: the factorizations stay few, and every tensor of every file is still read (the check)
RANKS = ["--router-rank", "2", "--expert-rank", "4", "--target", "*.q_proj"]
CRASH_AFTER = Path(__file__).parent / "crash_after_shards.py"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 12-layer tiny Mistral family with sharded inputs: layers.10 and .11 come before layers.2 in each file, so
    the plan's order differs from the files' order (gaps and re-reads for the integrity check)."""
    base, experts = make_family(tmp_path_factory.mktemp("hubfam"), "mistral", num_experts=2, num_hidden_layers=12)
    for folder in [base, *experts]:
        shard_model(folder)
    return base, experts


@pytest.fixture
def hub(family):
    base, experts = family
    with HubServer() as server:
        server.commits = {"org/base": server.push("org/base", base)}
        for i, expert in enumerate(experts):
            server.commits[f"org/expert{i}"] = server.push(f"org/expert{i}", expert)
        yield server


@pytest.fixture(scope="module")
def local_output(family, tmp_path_factory):
    """The same upscale from the local folders: the reference every Hub run must equal bit for bit."""
    base, experts = family
    out = tmp_path_factory.mktemp("local") / "out"
    argv = ["upscale", "--base", base, "--experts", ",".join(map(str, experts)), *RANKS, "--out", out]
    result = _run(argv, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out


def _env(hub: HubServer, hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="0",
        SMILE_HUB_RETRY_WAIT="0.05",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _run(argv, env, *prefix) -> subprocess.CompletedProcess:
    command = [sys.executable, *(prefix or ["-m", "smile_cli"]), *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _hub_argv(out, *extra, experts=("org/expert0", "org/expert1"), base="org/base"):
    return ["upscale", "--base", base, "--experts", ",".join(experts), *RANKS, "--out", out, "-q", *extra]


def _weights(folder: Path) -> dict[str, str]:
    return {k: v for k, v in folder_hashes(folder).items() if k.endswith(".safetensors")}


def _tensors(folder: Path) -> dict:
    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


def _cached_weights(hf_home: Path) -> list[Path]:
    """Weight files in a Hugging Face cache (the snapshots' links to the blobs)."""
    return [p for p in hf_home.rglob("*.safetensors") if p.is_file()]


def _header_bytes(folder: Path) -> int:
    """What reading only the safetensors headers of a folder's files costs: 8 + header length per file."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def test_dry_run_transfers_only_headers_and_prints_the_disk_each_mode_needs(tmp_path, hub, family):
    base, experts = family
    env = _env(hub, tmp_path / "hf")
    result = _run(_hub_argv(tmp_path / "out", "--dry-run", "--json"), env)
    assert result.returncode == 0, result.stderr
    sent = hub.sent_total(".safetensors")
    assert sent == sum(_header_bytes(f) for f in [base, *experts])  # two range requests per file, nothing more
    assert sent < 0.1 * sum(p.stat().st_size for f in [base, *experts] for p in f.glob("*.safetensors"))
    summary = json.loads(result.stdout)
    assert [i["commit"] for i in summary["inputs"]] == list(hub.commits.values())
    disk = summary["disk_bytes_by_mode"]
    weights = sum(i["weight_bytes"] for i in summary["inputs"])
    assert disk["stream"] == disk["auto"] == summary["output_bytes"]
    assert disk["download"] == summary["output_bytes"] + weights
    assert not (tmp_path / "out").exists() and not _cached_weights(tmp_path / "hf")
    text = _run(_hub_argv(tmp_path / "out", "--dry-run"), env)
    assert "disk --inputs download" in text.stdout and hub.commits["org/base"][:12] in text.stdout
    config = tmp_path / "job.yaml"  # `inputs:` in a config file, as --inputs
    config.write_text("base: org/base\nexperts: [org/expert0]\nrouter_rank: 2\nexpert_rank: 4\ninputs: download\n")
    result = _run(["upscale", "--config", config, "--dry-run", "--json"], env)
    assert [i["mode"] for i in json.loads(result.stdout)["inputs"]] == ["download", "download"], result.stderr


def test_validation_errors_come_before_any_tensor_byte(tmp_path, hub, family):
    """A shape mismatch between base and expert is reported from the headers alone."""
    base, _ = family
    other, _ = make_family(tmp_path / "other", "mistral", num_experts=1, num_hidden_layers=12, intermediate_size=40)
    hub.push("org/other", other)
    hub.reset_counts()
    result = _run(_hub_argv(tmp_path / "out", experts=("org/other",)), _env(hub, tmp_path / "hf"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "org/other" in result.stderr
    assert hub.sent_total(".safetensors") == _header_bytes(base) + _header_bytes(other)
    assert not (tmp_path / "out").exists()


def test_streamed_download_and_mixed_runs_equal_the_local_run(tmp_path, hub, family, local_output):
    base, experts = family
    sizes = sum(p.stat().st_size for f in [base, *experts] for p in f.glob("*.safetensors"))
    hf = tmp_path / "hf"
    result = _run(_hub_argv(tmp_path / "stream", "--inputs", "stream"), _env(hub, hf))
    assert result.returncode == 0, result.stderr
    assert _weights(tmp_path / "stream") == _weights(local_output)
    assert not _cached_weights(hf)  # nothing of the weights on disk
    streamed = hub.sent_total(".safetensors")
    # every byte is hashed once in file order; tensors the plan reads out of file order are fetched again
    assert sizes <= streamed < 2 * sizes
    manifest = json.loads((tmp_path / "stream" / "smile_manifest.json").read_text())
    assert [i["revision"] for i in manifest["inputs"]] == list(hub.commits.values())
    assert all("sha256" in f for i in manifest["inputs"] for f in i["files"])

    hub.reset_counts()
    result = _run(_hub_argv(tmp_path / "download", "--inputs", "download"), _env(hub, hf))
    assert result.returncode == 0, result.stderr
    assert _weights(tmp_path / "download") == _weights(local_output)
    headers = sum(_header_bytes(f) for f in [base, *experts])
    assert hub.sent_total(".safetensors") == sizes + headers  # planned from the headers, then each file downloaded
    assert len(_cached_weights(hf)) == 6

    # auto with expert0 cached, expert1 not in the cache, and the base a local folder: all three kinds mixed
    hf2 = tmp_path / "hf2"
    shutil.copytree(hf / "hub" / "models--org--expert0", hf2 / "hub" / "models--org--expert0")
    hub.reset_counts()
    argv = _hub_argv(tmp_path / "mixed", base=str(base))
    result = _run(argv, _env(hub, hf2))
    assert result.returncode == 0, result.stderr
    assert _weights(tmp_path / "mixed") == _weights(local_output)
    assert hub.sent_total(".safetensors") >= sum(p.stat().st_size for p in experts[1].glob("*.safetensors"))
    assert not any(k.startswith("org/expert0") and k.endswith(".safetensors") for k in hub.sent)
    assert not any(k.startswith("org/base") for k in hub.sent)


def test_connection_dropped_mid_tensor_and_500s_are_retried_and_resumed(tmp_path, hub, family, local_output):
    _, experts = family
    shard = "model-00002-of-00002.safetensors"
    tensors = _tensor_ranges(experts[0] / shard)
    begin, end = tensors["model.layers.5.mlp.up_proj.weight"]
    drop_at = begin + (end - begin) // 2
    hub.faults += [
        {"kind": "drop", "file": shard, "at": drop_at, "times": 1},
        {"kind": "status", "code": 500, "file": "model-00001-of-00002.safetensors", "times": 2},
        {"kind": "status", "code": 503, "target": "api", "times": 1},
    ]
    result = _run(_hub_argv(tmp_path / "out", "--inputs", "stream"), _env(hub, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert all(f["times"] == 0 for f in hub.faults)
    assert _weights(tmp_path / "out") == _weights(local_output)
    resumed = [r for r in hub.requests if r[1].endswith(shard) and r[2] and r[2].startswith(f"bytes={drop_at}-")]
    assert resumed, "the cut response is resumed from the first missing byte"


def test_corrupted_bytes_fail_naming_file_and_tensor_and_leave_no_output(tmp_path, hub, family):
    _, experts = family
    shard = "model-00002-of-00002.safetensors"
    begin, end = _tensor_ranges(experts[1] / shard)["model.layers.7.self_attn.q_proj.weight"]
    hub.faults.append({"kind": "corrupt", "repo": "org/expert1", "file": shard, "at": begin + 5})
    out = tmp_path / "out"
    result = _run(_hub_argv(out, "--inputs", "stream"), _env(hub, tmp_path / "hf"))
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "org/expert1" in line and shard in line and "sha256" in line
    assert "tensors used from it: 'model.layers." in line or "detected reading tensor 'model." in line
    assert not out.exists() and not staging_of(out).exists()


@pytest.mark.parametrize(
    "case, code, needle",
    [
        ("private", 2, "private"),
        ("gated", 2, "gated"),
        ("no-repo", 2, "no such model"),
        ("no-revision", 2, "revision 'v9' not found"),
        ("missing-shard", 2, "is missing"),
        ("api-500", 1, "org/base"),
    ],
)
def test_access_and_missing_things_exit_in_one_line(tmp_path, hub, family, case, code, needle):
    base, _ = family
    argv = _hub_argv(tmp_path / "out")
    if case == "private":
        hub.token = "secret"
    elif case == "gated":
        hub.gated.add("org/base")
    elif case == "no-repo":
        argv[argv.index("org/base")] = "org/nothing"
    elif case == "no-revision":
        argv[argv.index("org/base")] = "org/base@v9"
    elif case == "missing-shard":
        broken = tmp_path / "broken"
        shutil.copytree(base, broken)
        (broken / "model-00002-of-00002.safetensors").unlink()
        hub.push("org/base", broken)
    elif case == "api-500":
        hub.faults.append({"kind": "status", "code": 500, "target": "api"})
    env = _env(hub, tmp_path / "hf", SMILE_HUB_RETRIES="1")
    result = _run(argv, env)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()
    if case == "private":  # the user's token, as huggingface_hub reads it, opens the repository
        result = _run(argv, {**env, "HF_TOKEN": "secret"})
        assert result.returncode == 0, result.stderr


def test_a_commit_pushed_mid_run_does_not_mix_versions(tmp_path, hub, family, local_output):
    base, experts = family
    changed = tmp_path / "changed"
    shutil.copytree(experts[0], changed)
    shutil.copy(experts[1] / "model-00002-of-00002.safetensors", changed / "model-00002-of-00002.safetensors")
    pinned = hub.commits["org/expert0"]
    pushed = []
    first_shard_data = _tensor_ranges(experts[0] / "model-00001-of-00002.safetensors")
    start = min(b for b, _ in first_shard_data.values())
    hub.faults.append(
        {
            "kind": "call",
            "file": "model-00001-of-00002.safetensors",
            "min_start": start,
            "times": 1,
            "fn": lambda: pushed.append(hub.push("org/expert0", changed)),
        }
    )
    out = tmp_path / "out"
    result = _run(_hub_argv(out, "--inputs", "stream"), _env(hub, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert pushed and pushed[0] != pinned
    assert _weights(out) == _weights(local_output)
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert manifest["inputs"][1]["revision"] == pinned
    assert all(pinned in path for _, path, _ in hub.requests if "/org/expert0/resolve/" in path)


def test_resume_after_a_crash_does_not_refetch_verified_files(tmp_path, hub, family, local_output):
    env = _env(hub, tmp_path / "hf")
    out = tmp_path / "out"
    argv = _hub_argv(out, "--inputs", "stream", "--max-shard-size", "40KB")
    plan = json.loads(_run([*argv, "--dry-run", "--json"], env).stdout)
    assert plan["shards"] >= 6
    hub.reset_counts()
    crashed = _run([str(plan["shards"] - 2), *argv], env, str(CRASH_AFTER))
    assert crashed.returncode == -9, crashed.stderr
    first = dict(hub.sent)
    verified = {key for key in first if key.endswith("model-00001-of-00002.safetensors")}
    assert len(verified) == 3
    state = json.loads((staging_of(out) / ".smile-hub-digests.json").read_text())
    assert all(state[f"{k.split('/model-')[0]}/model-00001-of-00002.safetensors"]["verified"] for k in verified)
    hub.reset_counts()
    result = _run([*argv, "--resume"], env)
    assert result.returncode == 0, result.stderr
    for key in verified:  # not hashed again: read only for the headers and the tensors the remaining steps need
        repo, name = key.split("/model-")[0], "model-" + key.split("/model-")[1]
        assert hub.sent.get(key, 0) < 0.6 * family_file(family, repo, name).stat().st_size, (key, hub.sent)
    resumed, local = _tensors(out), _tensors(local_output)
    assert resumed.keys() == local.keys() and all(torch.equal(resumed[k], local[k]) for k in local)
    assert not (out / ".smile-hub-digests.json").exists()


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Peak RSS (VmHWM, peak_rss.PEAK_RSS_RUN) of streamed runs at 4 and 16 layers (inputs of ~50 and ~190 MB): the
    difference stays far below what holding the inputs would cost."""
    peaks = {}
    with HubServer() as server:
        for layers in (4, 16):
            config = mistral_7b_config(
                layers, hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4
            )
            config.vocab_size = 1000
            base, experts = write_family(tmp_path / f"l{layers}", config, 2, dtype=torch.float32)
            for name, folder in [("base", base), *((f"e{i}", e) for i, e in enumerate(experts))]:
                server.push(f"m{layers}/{name}", folder)
            argv = _hub_argv(
                tmp_path / f"out{layers}",
                "--inputs",
                "stream",
                base=f"m{layers}/base",
                experts=(f"m{layers}/e0", f"m{layers}/e1"),
            )
            result = _run(argv, _env(server, tmp_path / "hf"), "-c", PEAK_RSS_RUN)
            assert result.returncode == 0, result.stderr
            peaks[layers] = read_peak_rss(result.stderr)
            for folder in (base, *experts):
                shutil.rmtree(folder)
    inputs_growth = 3 * 12 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 1024) * 4
    assert peaks[16] - peaks[4] < 0.25 * inputs_growth, peaks


def family_file(family, repo: str, name: str) -> Path:
    base, experts = family
    return (base if repo == "org/base" else experts[int(repo[-1])]) / name


def _tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of a safetensors file's tensors."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {n: (8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1]) for n, e in header.items()}
