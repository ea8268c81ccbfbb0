"""A local model folder opened as a Checkpoint: its config checked, its weight files found (the index's shards, or
model.safetensors, or every *.safetensors), every safetensors header read and checked; pickle weights only with
--allow-pickle (pickles.py). A Hub id offline, or with pickle weights only, is read from its snapshot folder here.
"""

from __future__ import annotations

from pathlib import Path

from smile_cli.errors import InputError
from smile_cli.files import regular_file
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.checks import (
    check_index,
    read_config,
    read_index,
    refuse_quantized,
    weight_file_names,
)
from smile_cli.inputs.pickles import PICKLE_WEIGHTS, PickleCheckpoint, load_pickles, pickle_files
from smile_cli.inputs.resolve import resolve
from smile_cli.inputs.safetensors_format import INDEX_NAME, TensorInfo, read_safetensors_header


def open_checkpoint(
    ref: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    resolved: tuple[Path, str | None] | None = None,
) -> Checkpoint:
    """Resolve ref (unless `resolved` gives its folder and revision), read its config and every safetensors
    header, check that all shards are present. (A LoRA adapter is not a checkpoint: lora.py.)

    Inputs never run code: a config with auto_map (custom modeling code) is refused unless trust_remote_code,
    and even then its code is never imported (only tensors are read); pickle weights are refused unless
    allow_pickle, and then read with the weights-only unpickler. (A Hub id read from its remote headers, without
    a download: hub_checkpoint.py.)
    """
    folder, revision = resolved or resolve(ref)
    config, warnings = read_config(ref, folder, trust_remote_code)
    pickles = pickle_files(folder)
    if pickles and not _has_safetensors(folder):
        if not allow_pickle:
            raise InputError(
                f"{ref}: only pickle weights ({pickles[0].name}); pickle files can run code when loaded, so smile "
                "reads safetensors only (convert them, or pass --allow-pickle to load them weights-only)"
            )
        tensors, state = load_pickles(ref, folder, pickles)
        refuse_quantized(ref, config, tensors)
        warnings.append(f"{ref}: read from pickle files ({', '.join(p.name for p in pickles)}) weights-only")
        return PickleCheckpoint(ref, folder, config, tensors, revision, pickles, warnings, state=state)
    files = _weight_files(ref, folder)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        file_tensors, _ = read_safetensors_header(file)
        for name, info in file_tensors.items():
            if name in tensors:
                raise InputError(f"{ref}: tensor '{name}' appears in both {tensors[name].file.name} and {file.name}")
            tensors[name] = info
    check_index(ref, folder, tensors)
    refuse_quantized(ref, config, tensors)
    return Checkpoint(ref, folder, config, tensors, revision, files, warnings)


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / INDEX_NAME).exists()


def _weight_files(ref: str, folder: Path) -> list[Path]:
    """The folder's safetensors weight files (checks.weight_file_names), each a regular file; refused otherwise."""
    index = folder / INDEX_NAME

    def index_shards() -> list[str]:
        regular_file(index, ref)
        return list(read_index(ref, index).values())

    names = weight_file_names(ref, {path.name for path in folder.iterdir()}, index_shards)
    if names:
        return [folder / name for name in names if regular_file(folder / name, ref)]
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()] + [
        p.name for p in folder.glob("pytorch_model-*.bin")
    ]
    if pickles:
        raise InputError(
            f"{ref}: only pickle weights ({pickles[0]}); pickle files can run code when loaded, "
            "so smile reads safetensors only (convert the checkpoint to safetensors first)"
        )
    raise InputError(f"{ref}: no model.safetensors or model.safetensors.index.json in {folder}")
