"""Shared helpers of the tests: run the CLI (in-process), hash an output folder, damage checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from smile_cli.cli import run

# `smile upscale` options for the paper's per-token router, which tests/reference.py implements: an output compared
# with the reference is built with it explicitly (it is also what the default, --routing auto, gives today).
FAITHFUL = ("--routing", "faithful")


def smile(capsys, *argv) -> tuple[int, list[str]]:
    """Run the CLI in-process; (exit code, stderr lines)."""
    capsys.readouterr()
    code = run([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def upscale_argv(base, experts, out, *options) -> list[str]:
    """The arguments of `smile upscale` for base, a list of experts and out, then options (paths stay paths)."""
    return ["upscale", "--base", base, "--experts", ",".join(map(str, experts)), "--out", out, *options]


def upscale(base, experts, out, *options) -> int:
    """`smile upscale` run in-process; its exit code."""
    return run([str(a) for a in upscale_argv(base, experts, out, *options)])


def upscaled(base, experts, out, *options) -> Path:
    """`smile upscale` run in-process, which must succeed; the output folder."""
    code = upscale(base, experts, out, *options)
    assert code == 0, f"smile upscale exited with {code}"
    return Path(out)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.smile-staging"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite folder/model.safetensors with edit(state) applied (edit mutates the dict)."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with edit(header) applied, keeping its data bytes."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])


def shard_model(folder: Path) -> list[str]:
    """Split folder/model.safetensors into two shards with an index; returns the shard names."""
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for shard, part in zip(shards, (names[:half], names[half:]), strict=True):
        save_file({n: state[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
