"""Pickle checkpoints (pytorch_model.bin and its sharded index), read only with --allow-pickle and then only through
torch.load(weights_only=True, mmap=True): the restricted unpickler builds tensors and plain containers, never
arbitrary objects. Without the flag an input with pickle weights only is refused (local.py)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smile_cli.errors import InputError
from smile_cli.files import regular_file
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.checks import read_index
from smile_cli.inputs.safetensors_format import DTYPE_NAMES, TensorInfo

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


@dataclass
class PickleCheckpoint(Checkpoint):
    """An input whose weights are PyTorch pickles, read with torch.load(weights_only=True, mmap=True): the
    restricted unpickler builds tensors and plain containers only, never arbitrary objects (--allow-pickle)."""

    state: dict = field(default_factory=dict)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        tensor = self.state.get(info.name) if info is not None else None  # its name in the file (Checkpoint.renamed)
        if tensor is None:
            raise InputError(f"{self.ref}: tensor '{name}' is missing")
        return tensor.contiguous().clone()


def load_pickles(ref: str, folder: Path, files: list[Path]) -> tuple[dict[str, TensorInfo], dict]:
    """(each tensor's TensorInfo, for the plan; the state dict, for PickleCheckpoint.read) of the pickle files."""
    tensors: dict[str, TensorInfo] = {}
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first = str(e).splitlines()[0] if str(e) else "not a plain tensor pickle"
            raise InputError(f"{ref}: {path.name} refused by the weights-only loader: {first}") from e
        except (OSError, RuntimeError, ValueError, EOFError) as e:
            raise InputError(f"{ref}: {path.name} cannot be loaded: {str(e).splitlines()[0] if str(e) else e}") from e
        if not isinstance(loaded, dict):
            raise InputError(f"{ref}: {path.name} does not hold a state dict")
        for name, tensor in loaded.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise InputError(f"{ref}: {path.name} holds a non-tensor entry {name!r}")
            if name in state:
                raise InputError(f"{ref}: tensor '{name}' appears in two pickle files")
            if tensor.dtype not in DTYPE_NAMES:
                raise InputError(f"{ref}: tensor '{name}' has unsupported dtype {tensor.dtype}")
            state[name] = tensor
            nbytes = tensor.numel() * tensor.element_size()
            tensors[name] = TensorInfo(name, path, tensor.dtype, tuple(tensor.shape), 0, nbytes)
    return tensors, state


def pickle_files(folder: Path) -> list[Path]:
    """pytorch_model.bin, or the shards named by pytorch_model.bin.index.json."""
    index = folder / "pytorch_model.bin.index.json"
    if regular_file(index):
        names = sorted(set(read_index(folder.name, index).values()))
        return [folder / n for n in names]
    return [folder / "pytorch_model.bin"] if regular_file(folder / "pytorch_model.bin") else []
