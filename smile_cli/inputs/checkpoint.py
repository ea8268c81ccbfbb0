"""One input model as the run reads it (Checkpoint: its config and where each tensor lies), and what identifies its
content cheaply (its fingerprint, recorded in the manifest so that --resume refuses changed inputs).

Opening one: local.py (a folder: safetensors, or pickles with --allow-pickle: pickles.py), hub_checkpoint.py (a Hub
id read from its remote headers); experts.open_input chooses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smile_cli.inputs.safetensors_format import MAX_HEADER_BYTES, TensorInfo, read_tensor


@dataclass
class Checkpoint:
    """One input model: where it came from, its config, and where each of its tensors lies."""

    ref: str
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    revision: str | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def renamed(self, old: str, new: str) -> Checkpoint:
        """This checkpoint with tensors `old + rest` called `new + rest`: one saved from another model class than
        the base's (`layers.0...` from the bare model, `model.layers.0...` from the causal LM). Reads follow the
        new names (a tensor's info keeps its name in the file)."""
        tensors = {new + n[len(old) :] if n.startswith(old) else n: info for n, info in self.tensors.items()}
        return dataclasses.replace(self, tensors=tensors)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.ref, self.tensors, name)

    def fingerprint(self) -> dict:
        """What identifies this input's content, cheaply: see docs/robustness.md.

        Every weight file's size and the SHA-256 of its first bytes (the whole header of a safetensors file);
        for local folders also each file's mtime_ns (a Hub snapshot is pinned by its revision instead, and
        its files are content-addressed blobs); the SHA-256 of config.json.
        """
        config = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        files = file_fingerprints(self.files, self.revision)
        return {"ref": self.ref, "revision": self.revision, "config_sha256": config, "files": files}


def file_fingerprints(files: list[Path], revision: str | None) -> list[dict]:
    """Per weight file: name, size, SHA-256 of its first bytes (a safetensors file's whole header) and, for a
    local folder (no Hub revision), mtime_ns."""
    records = []
    for path in files:
        stat = path.stat()
        record = {"name": path.name, "size": stat.st_size}
        if revision is None:
            record["mtime_ns"] = stat.st_mtime_ns
        record["head_sha256"] = _head_sha256(path)
        records.append(record)
    return records


def _head_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and header, or of another file's first MiB."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            prefix = f.read(8)
            length = min(int.from_bytes(prefix, "little"), MAX_HEADER_BYTES) if len(prefix) == 8 else 0
            return hashlib.sha256(prefix + f.read(length)).hexdigest()
        return hashlib.sha256(f.read(2**20)).hexdigest()
