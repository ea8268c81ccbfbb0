"""Foreign code: the one rule for what code a model folder may make transformers import.

A SMILE output is loaded with `trust_remote_code=True` (its modeling code is in the folder), and transformers then
imports whatever the folder's JSON files name in `auto_map` (the model's, its tokenizer's, its image processor's),
plus a `--` form (`other/repo--module.Class`) that fetches and runs another repository's code. So every command that
loads or imports anything from a SMILE folder (route, verify's forward passes, export, a server) first asks
`check_own_code(folder)`, which holds the folder to exactly what `smile upscale` writes:

- configuration_smile.py and modeling_smile.py byte for byte this smile version's, and no other Python file in the
  folder;
- config.json's auto_map: AutoConfig at configuration_smile.Smile*, every other Auto class at modeling_smile.Smile*
  (no `--` form), and no custom_pipelines;
- no auto_map in any other file transformers reads one from (tokenizer_config.json, preprocessor_config.json,
  processor_config.json, ...): a SMILE output carries no tokenizer or processor code.

Inputs of `smile upscale` (base and experts) are another matter: their code is never imported, but an input whose
files name custom code (input_custom_code) is refused unless --trust-remote-code (inputs.checks.read_config), and the
output never carries that code or its auto_map (remove_custom_code).

This module imports nothing but the standard library, errors.py and files.py: a server can call it before it imports
transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from smile_cli.errors import InputError
from smile_cli.files import file_kind, read_json_or_none

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_smile.py", "modeling_smile.py")
CONFIG_MODULE, MODELING_MODULE = (name.removesuffix(".py") for name in MODELING_FILES)
# Files transformers reads an auto_map from, besides config.json: tokenizers, image processors, feature extractors,
# processors, video processors.
CODE_CONFIGS = (
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
_OWN_CLASS = re.compile(r"Smile[A-Za-z0-9_]+")


def check_own_code(folder: Path) -> None:
    """Refuse (InputError, one line naming the file, exit 2) a folder whose loading with trust_remote_code=True
    would import any code but this smile version's own modeling files (see the module docstring)."""
    problems = foreign_code(folder)
    if problems:
        raise InputError(
            f"{folder}: {problems[0]}; smile runs no code but its own (rebuild the folder with smile upscale, or "
            "restore the file from the smile package's smile_cli/modeling/)"
        )


def foreign_code(folder: Path) -> list[str]:
    """Every reason the code loading `folder` would import is not exactly this smile version's, one line each
    naming the file (verify reports them as defects; check_own_code refuses on the first)."""
    folder = Path(folder)
    problems = []
    for name in MODELING_FILES:
        path = folder / name
        kind = file_kind(path)
        if kind == "missing":
            problems.append(f"{name}: missing")
        elif kind != "file":
            problems.append(f"{name}: is {kind}, not a regular file")
        elif path.read_bytes() != (MODELING_DIR / name).read_bytes():
            problems.append(f"{name}: differs from the modeling code of this smile version")
    others = sorted(p.name for p in _entries(folder) if p.name.endswith(".py") and p.name not in MODELING_FILES)
    problems += [
        f"{name}: Python code that is not smile's (an output holds only {' and '.join(MODELING_FILES)})"
        for name in others
    ]
    config = read_json_or_none(folder / "config.json")
    if config is not None:
        auto_map = config.get("auto_map")
        if auto_map is not None and not isinstance(auto_map, dict):
            problems.append(f"config.json: auto_map is {type(auto_map).__name__}, not a mapping of smile's classes")
        for key, target in (auto_map if isinstance(auto_map, dict) else {}).items():
            if not _own_target(key, target):
                problems.append(f"config.json: auto_map {key} points at {target!r}, not at the files in this folder")
        if config.get("custom_pipelines"):
            problems.append("config.json: custom_pipelines names pipeline code that is not smile's")
    for name in CODE_CONFIGS:
        other = read_json_or_none(folder / name)
        if other is not None and other.get("auto_map"):
            problems.append(f"{name}: auto_map names custom code ({_describe(other['auto_map'])}), not smile's")
    return problems


def input_custom_code(folder: Path) -> list[tuple[str, str]]:
    """(file, what it names) for each file of an input folder whose auto_map names custom code, config.json first."""
    found = []
    for name in ("config.json", *CODE_CONFIGS):
        data = read_json_or_none(Path(folder) / name)
        if data is not None and data.get("auto_map"):
            found.append((name, _describe(data["auto_map"])))
    return found


def remove_custom_code(folder: Path) -> list[str]:
    """Drop auto_map from the output's tokenizer and processor configs (copied from an input accepted with
    --trust-remote-code: the code they name is not in the output, and is never copied there); returns the files
    changed. A file without auto_map is left byte for byte as it is."""
    changed = []
    for name in CODE_CONFIGS:
        path = Path(folder) / name
        data = read_json_or_none(path)
        if data is not None and "auto_map" in data:
            data.pop("auto_map")
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            changed.append(name)
    return changed


def _own_target(key, target) -> bool:
    """Whether an auto_map entry names one of the classes smile's own files build (output.smile_config)."""
    if not isinstance(target, str) or "--" in target or target.count(".") != 1:
        return False
    module, name = target.split(".")
    want = CONFIG_MODULE if key == "AutoConfig" else MODELING_MODULE
    return module == want and bool(_OWN_CLASS.fullmatch(name))


def _describe(auto_map) -> str:
    if isinstance(auto_map, dict):
        return ", ".join(f"{k}: {v}" for k, v in auto_map.items())[:200]
    return repr(auto_map)[:200]


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []
