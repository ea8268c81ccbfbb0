"""Streaming writer of sharded safetensors: header first, then each tensor's bytes as they are produced.

Every name, shape and dtype is known from the plan, so a shard's header can be written before any of its
tensors exists; memory holds one tensor at a time, never a whole shard. A shard is written under a
temporary name, fsynced, and renamed when its last byte is in; its SHA-256 is computed on the way.

One exception: an expert's factors may come out smaller than planned (a dense update's numerical rank below the
given rank: experts.kept_rank), known only once they are computed. Such a tensor is written at its own shape
(write(shrink=True)); its shard keeps its place in the layout, and when the shard is complete its header is
rewritten in place with the shapes written, padded with spaces to the length the planned one took (smaller
numbers are never longer), and its SHA-256 is read back. Shards without such a tensor are byte for byte the
planned ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from smile_cli.inputs.safetensors_format import INDEX_NAME, safetensors_header

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def assign_shards(entries, max_shard_size: int) -> list[OutputTensor]:
    """Fill shards in order; a new shard starts when the next tensor would pass max_shard_size."""
    tensors, shard, size = [], 0, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if size and size + nbytes > max_shard_size:
            shard, size = shard + 1, 0
        tensors.append(OutputTensor(name, tuple(shape), dtype, shard))
        size += nbytes
    return tensors


def shard_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


@dataclass
class WrittenShard:
    """A complete shard: its name, size and SHA-256, and the stored ranks of the modules whose expert factors
    (experts_svh) it holds where they are below the planned ones ({module: [rank of each expert]}, else None)."""

    name: str
    size: int
    sha256: str
    ranks: dict[str, list[int]] | None = None

    def record(self) -> dict:
        """As the journal, the parts' records and the manifest list it (ranks only when there are any)."""
        record = {"name": self.name, "size": self.size, "sha256": self.sha256}
        return {**record, "ranks": self.ranks} if self.ranks else record

    @classmethod
    def of_record(cls, record: dict) -> WrittenShard:
        ranks = record.get("ranks")
        return cls(record["name"], record["size"], record["sha256"], ranks if isinstance(ranks, dict) else None)


def stored_ranks(shards) -> dict[str, tuple[int, ...]]:
    """{module: expert ranks} of every module whose expert factors were stored below the planned ranks, from
    the shards (WrittenShard) that hold them."""
    return {m: tuple(int(k) for k in r) for shard in shards for m, r in (shard.ranks or {}).items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardedWriter:
    """Writes the planned tensors, in plan order, into `folder`. Call write() for each tensor (a tensor may
    come in consecutive row chunks: each write() appends), then finish()."""

    def __init__(
        self,
        folder: Path,
        tensors: list[OutputTensor],
        num_shards: int,
        done: dict[str, WrittenShard] | None = None,
        on_shard=None,
    ):
        """done: shards complete from an earlier run (by name), kept as they are: their tensors are passed
        to skip() or written and discarded. on_shard(WrittenShard) is called as each new shard is complete."""
        self.folder = folder
        self.done = dict(done or {})
        self.on_shard = on_shard
        self.names = shard_names(num_shards)
        self.by_shard: list[list[OutputTensor]] = [[] for _ in range(num_shards)]
        for t in tensors:
            self.by_shard[t.shard].append(t)
        self.queue = list(tensors)
        self.position = 0  # index in queue of the tensor being written
        self.pending = 0  # bytes of the current tensor already written
        self.file = None
        self.hash = None
        self.written: list[WrittenShard] = []
        self._shard_of = {t.name: t.shard for t in tensors}
        self.header_length = 0  # bytes the open shard's header takes
        self.resized: set[int] = set()  # shards holding a tensor written smaller than planned
        self.ranks: dict[int, dict[str, list[int]]] = {}  # shard -> stored ranks of the factors it holds

    def is_done(self, name: str) -> bool:
        """Whether the planned tensor `name` lies in a shard complete from an earlier run (False for a tensor
        this writer does not write: another part's)."""
        return name in self._shard_of and self.names[self._shard_of[name]] in self.done

    def skip(self, name: str) -> None:
        """Pass over the next expected tensor, which lies in a shard complete from an earlier run."""
        expected = self.expects()
        if expected is None or expected.name != name or self.pending or not self.is_done(name):
            raise RuntimeError(f"writer cannot skip {name!r}")
        self._advance(expected)

    def expects(self) -> OutputTensor | None:
        return self.queue[self.position] if self.position < len(self.queue) else None

    def write(self, name: str, tensor: torch.Tensor, *, shrink: bool = False, ranks: dict | None = None) -> None:
        """Append tensor's bytes to the planned tensor `name`. shrink: the tensor is whole and may be smaller than
        planned in any dimension (see the module docstring); ranks: the stored ranks it implies, recorded with
        its shard ({module: [rank of each expert]})."""
        expected = self.expects()
        if expected is None or expected.name != name:
            raise RuntimeError(f"writer expected {expected and expected.name!r}, got {name!r}")
        if shrink and tuple(tensor.shape) != expected.shape:
            expected = self._resize(expected, tuple(tensor.shape))
        if ranks:
            self.ranks.setdefault(expected.shard, {}).update(ranks)
        if tensor.dtype != expected.dtype:
            raise RuntimeError(f"{name}: dtype {tensor.dtype}, planned {expected.dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self.pending + data.nbytes > expected.nbytes or (tensor.dim() and tensor.shape[1:] != expected.shape[1:]):
            raise RuntimeError(f"{name}: shape {tuple(tensor.shape)} does not fit the planned {expected.shape}")
        if not self.is_done(name):  # a tensor of a kept shard (its step spans two shards) is discarded
            if self.file is None:
                self._open(expected.shard)
            self.file.write(data)
            self.hash.update(data)
        self.pending += data.nbytes
        if self.pending == expected.nbytes:
            self.pending = 0
            self._advance(expected)

    def _resize(self, planned: OutputTensor, shape: tuple[int, ...]) -> OutputTensor:
        smaller = len(shape) == len(planned.shape) and all(a <= b for a, b in zip(shape, planned.shape, strict=True))
        if self.pending or not smaller:
            raise RuntimeError(f"{planned.name}: shape {shape} is not a whole tensor within planned {planned.shape}")
        actual = OutputTensor(planned.name, shape, planned.dtype, planned.shard)
        self.queue[self.position] = actual
        tensors = self.by_shard[planned.shard]
        tensors[tensors.index(planned)] = actual
        self.resized.add(planned.shard)
        return actual

    def _advance(self, finished: OutputTensor) -> None:
        self.position += 1
        following = self.expects()
        if following is None or following.shard != finished.shard:
            name = self.names[finished.shard]
            if name in self.done:
                self.written.append(self.done[name])
            else:
                self._close(finished.shard)

    def _open(self, shard: int) -> None:
        header = safetensors_header(self.by_shard[shard], {"format": "pt"})
        self.file = open(self.folder / (self.names[shard] + PARTIAL_SUFFIX), "wb")
        self.hash = hashlib.sha256()
        self.file.write(header)
        self.hash.update(header)
        self.header_length = len(header)

    def _close(self, shard: int) -> None:
        name = self.names[shard]
        size = self.header_length + sum(t.nbytes for t in self.by_shard[shard])
        if shard in self.resized:  # the header as written: the shapes came out smaller than planned
            self.file.seek(0)
            self.file.write(safetensors_header(self.by_shard[shard], {"format": "pt"}, self.header_length))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        path = self.folder / (name + PARTIAL_SUFFIX)
        digest = file_sha256(path) if shard in self.resized else self.hash.hexdigest()
        os.replace(path, self.folder / name)
        shard = WrittenShard(name, size, digest, self.ranks.get(shard))
        self.written.append(shard)
        if self.on_shard is not None:
            self.on_shard(shard)

    def abort(self) -> None:
        """Close and delete the shard being written (complete shards stay)."""
        if self.file is not None:
            path = Path(self.file.name)
            try:
                self.file.close()
            except OSError:  # e.g. no space left for the buffered bytes: the file goes anyway
                pass
            self.file = None
            path.unlink(missing_ok=True)

    def finish(self) -> list[WrittenShard]:
        """Check that every expected tensor came; returns the shards written (the index is written by whoever
        finishes the folder: write_index)."""
        if self.expects() is not None:
            raise RuntimeError(f"writer finished early: {self.expects().name!r} was never written")
        return self.written


def write_index(folder: Path, tensors: list[OutputTensor], names: list[str]) -> None:
    """model.safetensors.index.json for all planned tensors."""
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t.name: names[t.shard] for t in sorted(tensors, key=lambda t: t.name)},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a temporary file, fsynced, renamed over path."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
