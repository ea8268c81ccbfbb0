"""Hub inputs read without a local copy: a Hub id opened from its remote headers, its tensors read by mode.

A Hub id `org/name[@revision]` is pinned to a commit hash when it is opened (`HfApi.model_info`, which also gives
each file's size and LFS sha256). config.json, the safetensors index, tokenizer and chat-template files and the
model card are fetched (kilobytes to a few MB, into the usual Hugging Face cache: the plan checks vocabularies);
each safetensors file's header is read with two HTTP range requests. That is all a plan and
`--dry-run` transfer. Tensors are then read as the plan uses them, by mode (`--inputs`):

- stream: range requests to `resolve/<commit>/<file>`; nothing of the weights is written to disk;
- download: each weight file is downloaded into the cache first (hf_hub_download), then read from there;
- auto: files already in the local cache are read from it, the others streamed.

Bytes are read through hub_stream.py (one retry policy) and checked as they come through hub_integrity.py; a run's
Hub inputs as a whole (downloads, digests saved for --resume, the final check): hub_session.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

from smile_cli.errors import InputError
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.checks import (
    check_index,
    read_config,
    read_index,
    refuse_quantized,
    weight_file_names,
)
from smile_cli.inputs.hub_integrity import FileCheck
from smile_cli.inputs.hub_stream import LocalSource, RemoteSource, hub_call
from smile_cli.inputs.resolve import HUB_ALLOW_PATTERNS
from smile_cli.inputs.safetensors_format import INDEX_NAME, header_length, parse_safetensors_header

INPUT_MODES = ("stream", "download", "auto")


@dataclass
class HubCheckpoint(Checkpoint):
    """A Hub model at a pinned commit whose weight files are read through FileCheck (remote or cached)."""

    repo_id: str = ""
    mode: str = "auto"
    checks: dict[str, FileCheck] = field(default_factory=dict)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.ref}: tensor '{name}' is missing")
        return self.checks[info.file.name].read(info).view(info.dtype).reshape(info.shape)

    def fingerprint(self) -> dict:
        config = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        files = [{"name": n, "size": c.size, "sha256": c.expected} for n, c in self.checks.items()]
        return {"ref": self.ref, "revision": self.revision, "config_sha256": config, "files": files}

    def streamed_bytes(self) -> int:
        return sum(c.size for c in self.checks.values() if isinstance(c.source, RemoteSource))

    def fetch(self) -> None:
        """Before a run in download mode: download the weight files not in the cache, then read them there."""
        from huggingface_hub import hf_hub_download

        for name, check in self.checks.items():
            if self.mode == "download" and isinstance(check.source, RemoteSource):
                path = hub_call(self.ref, hf_hub_download, self.repo_id, name, revision=self.revision)
                check.source = LocalSource(Path(path))


def open_hub_checkpoint(ref: str, mode: str, *, trust_remote_code: bool = False) -> HubCheckpoint | None:
    """Pin ref's revision, fetch config.json and the index, read each safetensors header by range requests.

    Returns None for a LoRA adapter or a repository with only pickle weights: those are downloaded (local.py, lora.py).
    """
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    if mode not in INPUT_MODES:
        raise InputError(f"--inputs {mode!r}: use one of {', '.join(INPUT_MODES)}")
    repo_id, _, revision = ref.partition("@")
    info = hub_call(ref, HfApi().model_info, repo_id, revision=revision or None, files_metadata=True)
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    if "adapter_config.json" in siblings and "config.json" not in siblings:
        return None
    if "config.json" not in siblings:
        raise InputError(f"{ref}: no config.json in the repository at {commit}")
    names = _weight_names(ref, repo_id, commit, siblings)
    if names is None:
        return None
    # config.json, tokenizer and chat-template files, the model card: small, read by the plan (vocab.py)
    folder = Path(hub_call(ref, hf_hub_download, repo_id, "config.json", revision=commit)).parent
    for name in sorted(n for n in siblings if _small_file(n) and n != "config.json"):
        hub_call(ref, hf_hub_download, repo_id, name, revision=commit)
    config, warnings = read_config(ref, folder, trust_remote_code)
    checkpoint = HubCheckpoint(
        ref, folder, config, {}, commit, [folder / n for n in names], warnings, repo_id=repo_id, mode=mode
    )
    for name in names:
        sibling = siblings[name]
        sha = sibling.lfs.sha256 if sibling.lfs else None
        if not sha or sibling.size is None:
            raise InputError(f"{ref}: {name} has no published LFS sha256 on the Hub; cannot verify it")
        label = f"{repo_id}@{commit[:12]}/{name}"
        cached = try_to_load_from_cache(repo_id, name, revision=commit) if mode != "stream" else None
        source = LocalSource(Path(cached)) if isinstance(cached, str) else RemoteSource(repo_id, name, commit, label)
        check = FileCheck(label, sibling.size, sha, source)
        path = folder / name
        prefix = check.header_bytes(8)  # two range requests: the length, then exactly the header
        raw = check.header_bytes(8 + header_length(path, prefix, sibling.size))
        tensors, _ = parse_safetensors_header(path, raw, sibling.size)
        check.set_layout(list(tensors.values()))
        checkpoint.checks[name] = check
        for tensor_name, tensor_info in tensors.items():
            if tensor_name in checkpoint.tensors:
                other = checkpoint.tensors[tensor_name].file.name
                raise InputError(f"{ref}: tensor '{tensor_name}' appears in both {other} and {name}")
            checkpoint.tensors[tensor_name] = tensor_info
    check_index(ref, folder, checkpoint.tensors)
    refuse_quantized(ref, config, checkpoint.tensors)
    return checkpoint


def _weight_names(ref: str, repo_id: str, commit: str, siblings: dict) -> list[str] | None:
    """The safetensors files the model's weights are in (index first); None when there are only pickles."""
    from huggingface_hub import hf_hub_download

    def index_shards() -> list[str]:
        index = Path(hub_call(ref, hf_hub_download, repo_id, INDEX_NAME, revision=commit))
        return list(read_index(ref, index).values())

    names = weight_file_names(ref, set(siblings), index_shards)
    if names:
        return names
    if any(n.endswith(".bin") or n.endswith(".pt") for n in siblings):
        return None
    raise InputError(f"{ref}: no model.safetensors or model.safetensors.index.json in the repository at {commit}")


def _small_file(name: str) -> bool:
    return not name.endswith(".safetensors") and any(fnmatch(name, p) for p in HUB_ALLOW_PATTERNS)
