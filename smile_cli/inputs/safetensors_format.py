"""The safetensors format, read and written: dtype names, a header parsed and checked, one tensor read, a header made.

A file is an 8-byte little-endian length, a JSON header (each tensor's dtype, shape and byte range in the data
buffer, and an optional `__metadata__` object of strings), then the data buffer. Reading parses only the header up
front; a tensor's bytes are read with `readinto` into a fresh buffer when asked for, so memory holds the tensors in
use and nothing else (no memory map whose touched pages would pile up in the process's resident set). Writing
makes the header from names, shapes and dtypes alone (writer.py writes each tensor's bytes after it as they come).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from smile_cli.errors import InputError
from smile_cli.files import regular_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's weight_map: tensor -> shard file


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors file's header: (tensors by name, metadata).

    Every malformation (short file, oversized or non-JSON header, unknown dtype, byte ranges that do not
    match the shape or do not tile the data buffer exactly) raises InputError naming the file; so does a path that
    is not a regular file (a FIFO, a device, a folder), which is never opened.
    """
    if not regular_file(path):
        raise InputError(f"{path}: missing")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = header_length(path, f.read(8), size)
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_safetensors_header(path, raw, size)


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes (file size `size`), checked."""
    if len(prefix) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise InputError(f"{path}: corrupt safetensors header (claims {header_len} bytes)")
    return header_len


def parse_safetensors_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the JSON header `raw` of the safetensors file `path` of `size` bytes (wherever its bytes
    come from: a local file, or range requests to the Hub: hub_checkpoint.py)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    except RecursionError as e:
        raise InputError(f"{path}: corrupt safetensors header (nested too deeply)") from e
    except _DuplicateKey as e:
        raise InputError(f"{path}: corrupt safetensors header (tensor '{e.args[0]}' appears twice)") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start)
    _check_tiling(path, tensors.values(), data_start, size)
    return tensors, metadata


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    bad = f"{path}: corrupt safetensors header entry for tensor '{name}'"
    if not isinstance(entry, dict):
        raise InputError(bad)
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype is None:
        raise InputError(f"{bad} (unknown dtype {entry.get('dtype')!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f"{bad} (bad shape {shape!r})")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"{bad} (bad data_offsets {offsets!r})")
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise InputError(f"{bad} (holds {offsets[1] - offsets[0]} bytes, its shape needs {expected})")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_tiling(path: Path, infos, data_start: int, file_size: int) -> None:
    """Tensors must cover the data buffer exactly: no holes, no overlaps, nothing past the end."""
    position = data_start
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            raise InputError(f"{path}: corrupt safetensors header (tensor '{info.name}' overlaps or leaves a hole)")
        position = info.end
    if position > file_size:
        raise InputError(f"{path}: truncated safetensors file (tensor data runs past the end of the file)")
    if position < file_size:
        raise InputError(f"{path}: corrupt safetensors file ({file_size - position} bytes after the last tensor)")


def read_tensor(ref: str, tensors: dict[str, TensorInfo], name: str, row: int | None = None) -> torch.Tensor:
    """Read one tensor, or only its row `row` (along the first dimension), into fresh memory (no memory map),
    checking that the file still holds it."""
    info = tensors.get(name)
    if info is None:
        raise InputError(f"{ref}: tensor '{name}' is missing")
    begin, nbytes, shape = info.begin, info.nbytes, info.shape
    if row is not None:
        nbytes //= shape[0]
        begin, shape = begin + row * nbytes, shape[1:]
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(info.file, "rb") as f:
            f.seek(begin)
            got = f.readinto(buffer.numpy()) if nbytes else 0
    except OSError as e:
        raise InputError(f"{ref}: cannot read tensor '{name}' from {info.file}: {e.strerror or e}") from e
    if got != nbytes:
        raise InputError(f"{ref}: {info.file.name} is truncated (tensor '{name}')")
    return buffer.view(info.dtype).reshape(shape)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def safetensors_header(tensors: list, metadata: dict[str, str], length: int | None = None) -> bytes:
    """The 8-byte length and JSON header of a file holding `tensors` (each with name, shape, dtype and nbytes:
    writer.OutputTensor) in this order, padded to 8 bytes (to `length` bytes in all, when given: the room an
    earlier header of the same file took)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw) % 8) if length is None else length - 8 - len(raw))
    if length is not None and len(raw) + 8 != length:
        raise RuntimeError(f"a safetensors header of {len(raw) + 8} bytes does not fit in {length}")
    return len(raw).to_bytes(8, "little") + raw
