"""What a path is, told without opening it: every file smile reads from a folder must be a regular file.

Opening a FIFO for reading blocks until a writer comes (forever, for a planted one), a device can be endless or
have effects when opened, and a folder or a symbolic link loop where a file is expected fails in ways that say
little. So readers ask `regular_file` first, which looks at the path with stat() only, and refuse anything else in
one line (InputError, exit 2) naming the path and what it is.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import stat
from pathlib import Path

from smile_cli.errors import InputError

# The names smile (or transformers, for a folder it loads) reads files by: configs, weights, tokenizers, templates,
# code, smile's own metadata.
READ_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.ckpt",
    "*.py",
    "*.jinja",
    "*.yaml",
    "*.model",
    "*.txt",
    "tokenizer*",
    "*.partial",
)


def file_kind(path: Path) -> str:
    """'file', 'missing', or what else the path is: 'a folder', 'a FIFO', 'a device', 'a socket', 'a symbolic link
    loop', 'a dangling symbolic link', or why it cannot be looked at."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symbolic link" if os.path.islink(path) else "missing"
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def regular_file(path: Path, what: str | None = None) -> bool:
    """True for a regular file, False when nothing is there; InputError (naming `what`: path) for anything else."""
    kind = file_kind(path)
    if kind == "missing":
        return False
    if kind != "file":
        prefix = f"{what}: " if what else ""
        raise InputError(f"{prefix}{path}: is {kind}, not a regular file; smile reads only regular files")
    return True


def check_folder_files(folder: Path, what: str | None = None) -> None:
    """Refuse (InputError naming the first) any entry of the folder whose name smile reads (READ_PATTERNS) but that
    is not a regular file: a FIFO, a device, a folder, a dangling symbolic link or a loop. Other entries (sub-folders
    such as original/, files smile does not read) are left alone."""
    try:
        with os.scandir(folder) as scanned:
            names = sorted(entry.name for entry in scanned)
    except OSError as e:
        raise InputError(f"{what or folder}: cannot list the folder: {e.strerror or e}") from e
    for name in names:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in READ_PATTERNS):
            regular_file(Path(folder) / name, what)


# What reading a JSON file can raise: unreadable (OSError), not UTF-8 or not JSON (ValueError), nested too deeply.
JSON_ERRORS = (OSError, ValueError, RecursionError)


def load_json(path: Path):
    """The JSON value in the file at path: the one way smile reads a JSON file. Raises one of JSON_ERRORS, which
    every caller turns into its own report (one InputError line, a verify defect, a fallback)."""
    return json.loads(Path(path).read_text())


def read_json_or_none(path: Path) -> dict | None:
    """A JSON object file's content; None when absent, not a regular file, unreadable or not a JSON object (for
    the checks that only ask whether a file is smile's or what it names; the file's own reader reports the rest)."""
    if file_kind(path) != "file":
        return None
    try:
        data = load_json(path)
    except JSON_ERRORS:
        return None
    return data if isinstance(data, dict) else None
