"""The lifecycle of an output folder: checked location, a staging folder beside it (`.NAME.smile-staging`, or
`.NAME.smile-export`), its journal and resuming from it, and the move into place that never loses a model.

Every command that writes a folder (upscale, assemble, export) writes into staging and calls move_into_place
when the folder is complete, so the final name never holds a partial output.

What may be replaced or deleted (check_output_location, check_own_staging): smile deletes only what it can
recognise as its own: an output folder holding smile's manifest (smile_manifest.json, "tool": "smile"; exports
write one too), an empty folder, or its own staging folder (empty, or holding a journal, a part record or a
manifest of smile's). `--force` replaces such a folder; anything else (a home folder, a project, a user's folder
that happens to be named like the staging folder) is refused in one line naming the path, with or without --force.

A run writes smile_manifest.partial.json into staging before the first tensor (tool version, options, input
fingerprints, no shards) and rewrites it, atomically, as each shard is complete. `--resume` reads it back:
if the version, options and inputs are unchanged, every recorded shard whose size and SHA-256 still match is
kept and everything else in the folder is deleted and recomputed. A part of a run in parts keeps the same kind
of journal, its part record (distributed.py), and resumes from it the same way, clearing only its own shards.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path

from smile_cli.errors import InputError, SmileError
from smile_cli.files import file_kind, read_json_or_none
from smile_cli.output import MANIFEST_NAME, PARTIAL_MANIFEST_NAME
from smile_cli.writer import WrittenShard, file_sha256, shard_names, write_json

log = logging.getLogger("smile")
PART_GLOB = ".smile-part-*.json"  # the journals of a run in parts (distributed.py)


def staging_path(out: Path, kind: str = "staging") -> Path:
    return out.parent / f".{out.name}.smile-{kind}"


def replaced_path(out: Path) -> Path:
    """Where move_into_place puts an existing output (--force) until the new one is in place."""
    return out.parent / f".{out.name}.smile-replaced"


def is_own_output(folder: Path) -> bool:
    """Whether folder is one smile may replace with --force: empty, or holding smile's manifest (or an export's card,
    for exports written before they held one)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    return _is_smile_record(folder / MANIFEST_NAME) or _is_older_export(folder)


def _is_older_export(folder: Path) -> bool:
    """An export written before exports held a manifest: recognised by the card smile export writes (export._card)."""
    card = folder / "README.md"
    if file_kind(card) != "file":
        return False
    with open(card, "rb") as f:
        head = f.read(300).decode("utf-8", "replace")
    return head.startswith("# Expert ") and "of a SMILE model\n\nExported by `smile export`" in head


def is_own_staging(staging: Path) -> bool:
    """Whether staging is a staging folder smile made: empty, or holding a journal, a part record or a manifest of
    smile's (a run killed before its journal was written leaves it empty: the journal precedes every shard)."""
    if staging.is_symlink() or not staging.is_dir():
        return False
    # one listing: parts of one run start at once (torchrun, job arrays), and another part's first record may be
    # in flight (writer.write_json's temporary file, renamed a moment later: two listings could see neither)
    entries = list(staging.iterdir())
    records = (PARTIAL_MANIFEST_NAME, MANIFEST_NAME)
    for path in entries:
        if path.name in records or fnmatch.fnmatch(path.name, PART_GLOB):
            if _is_smile_record(path):
                return True
        elif path.name.removesuffix(".tmp") in records or fnmatch.fnmatch(path.name, PART_GLOB + ".tmp"):
            if not os.path.lexists(path) or file_kind(path) == "file":  # gone since: renamed into its record
                return True
    return not entries


def check_own_staging(staging: Path) -> None:
    """InputError unless staging is absent or smile's own (is_own_staging): it is deleted or reused, never a
    folder of the user's that happens to have its name."""
    if os.path.lexists(staging) and not is_own_staging(staging):
        raise InputError(
            f"{staging}: exists and was not made by smile (smile builds its output in a folder of this name); "
            "move it away and run again"
        )


def _is_smile_record(path: Path) -> bool:
    if file_kind(path) != "file":
        return False
    data = read_json_or_none(path)
    return data is not None and data.get("tool") == "smile"


def check_output_location(out: Path, inputs: list[tuple[str, Path]], force: bool) -> None:
    """out may be written: absent, or an empty folder, or with force a folder smile recognises as its own output
    (is_own_output); not a symbolic link; and it neither lies inside nor contains any input (ref, folder)."""
    if out.is_symlink():
        kind = file_kind(out)
        what = f" ({kind[2:]})" if "symbolic link" in kind else ""
        raise InputError(f"{out}: is a symbolic link{what}; give the folder itself, or a new name, as the output")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        own = is_own_output(out)
        if not own:
            raise InputError(
                f"{out}: exists, is not empty and is not an output of smile (no smile_manifest.json of smile's); "
                "--force replaces only smile's own outputs or an empty folder: move its files away or choose "
                "another output folder"
            )
        if any(out.iterdir()) and not force:
            raise InputError(f"{out}: exists and is not empty (use --force to replace it)")
    aside = replaced_path(out)
    if os.path.lexists(aside) and not is_own_output(aside):
        raise InputError(
            f"{aside}: exists and was not made by smile (it is where --force sets aside the old "
            "output): move it away and run again"
        )
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as e:
        raise InputError(f"{out}: cannot be resolved ({e})") from e
    for ref, path in inputs:
        source = path.resolve()
        if resolved == source or source in resolved.parents:
            raise InputError(f"{out}: the output folder lies inside the input {ref}")
        if resolved in source.parents:
            raise InputError(f"{out}: the output folder contains the input {ref}")


def fresh_staging(staging: Path, keep: bool = False) -> None:
    """An empty staging folder (keep: the one there, if any, as it is: a process group's ranks resume it)."""
    try:
        if staging.exists() and not keep:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=keep)
    except OSError as e:
        raise InputError(f"{staging.parent}: cannot write the output there: {e.strerror or e}") from e


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to out. An existing out (allowed by --force) is renamed aside first
    and deleted only once staging is in place; if the rename fails, out is put back and the complete output
    stays in staging (SmileError saying so): at no point is neither there."""
    old = None
    try:
        if out.exists():
            old = replaced_path(out)
            if os.path.lexists(old) and not is_own_output(old):  # checked up front too (check_output_location)
                raise OSError(f"{old} exists and is not smile's")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        staging.rename(out)
    except OSError as e:
        if old is not None and not out.exists():
            old.rename(out)
        raise SmileError(
            f"{out}: cannot move the finished model into place: {e.strerror or e}; it is complete in {staging}"
        ) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Journal:
    """A journal file in staging: the manifest head plus the shards complete so far, rewritten atomically as each
    shard completes (a single run's smile_manifest.partial.json, or a part's record: see distributed.py)."""

    def __init__(self, path: Path, head: dict, done: dict[str, WrittenShard]):
        self.path = path
        self.head = head
        self.shards = list(done.values())
        self._write()

    def add(self, shard: WrittenShard) -> None:
        self.shards.append(shard)
        self._write()

    def complete(self, shards: list[WrittenShard], **extra) -> None:
        """Record that every shard is written (a part's last word; a single run writes the manifest instead)."""
        self.shards = list(shards)
        self._write(complete=True, **extra)

    def _write(self, complete: bool = False, **extra) -> None:
        shards = [s.record() for s in self.shards]
        write_json(self.path, {**self.head, "complete": complete, "shards": shards, **extra})


def left_by_interrupted_run(staging: Path) -> InputError:
    return InputError(
        f"{staging}: an interrupted run left this folder; run again with --resume to continue it, "
        "or with --force to start over"
    )


def open_staging(staging: Path, head: dict, num_shards: int, *, resume: bool, force: bool) -> dict[str, WrittenShard]:
    """Create the staging folder, or reopen it with resume; returns the shards kept from an earlier run."""
    check_own_staging(staging)
    if staging.exists():
        if resume:
            return _reopen(staging, head, num_shards)
        if not force:
            raise left_by_interrupted_run(staging)
    elif resume:
        log.info("nothing to resume (no %s): starting from the beginning", staging)
    fresh_staging(staging)
    return {}


def _reopen(staging: Path, head: dict, num_shards: int) -> dict[str, WrittenShard]:
    done = kept_shards(staging / PARTIAL_MANIFEST_NAME, head, set(shard_names(num_shards)), str(staging))
    if done is None and any(staging.glob(PART_GLOB)):  # parts' work: not this single run's to discard
        raise InputError(
            f"{staging}: holds the parts of a run in parts; resume them with --shard i/N --resume (or torchrun "
            "with --resume), or use --force to start over"
        )
    if done is None:  # killed before the journal was written: nothing was computed yet
        log.info("%s holds no journal: starting from the beginning", staging)
        fresh_staging(staging)
        return {}
    for path in staging.iterdir():
        if path.name not in done and path.name != PARTIAL_MANIFEST_NAME:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    log.info("resuming %s: %d of %d shard(s) kept", staging, len(done), num_shards)
    return done


def kept_shards(
    journal_path: Path, head: dict, planned: set[str], what: str, start_over: str = "use --force"
) -> dict[str, WrittenShard] | None:
    """The shards an earlier run recorded in the journal at journal_path that are among `planned` and whose size
    and SHA-256 still match, by name; None when there is no journal. Raises InputError (cannot resume `what`;
    `start_over` to start over) when the version, options or inputs changed since. Deletes nothing."""
    journal = read_json_or_none(journal_path)
    if journal is None:
        return None
    changes = describe_changes(journal, head)
    if changes:
        raise InputError(f"cannot resume {what}: {'; '.join(changes)} ({start_over} to start over)")
    done: dict[str, WrittenShard] = {}
    for record in _records(journal):
        name, path = record.get("name"), journal_path.parent / str(record.get("name"))
        if name not in planned or not path.is_file():
            continue
        if path.stat().st_size == record.get("size") and file_sha256(path) == record.get("sha256"):
            done[name] = WrittenShard.of_record(record)
        else:
            log.warning("%s: does not match its checksum; it is recomputed", path)
    return done


def describe_changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifest heads (version, options, math library and threads, allocated ranks,
    inputs), one short phrase each."""
    changes = []
    if not isinstance(old.get("options"), dict) or not isinstance(old.get("inputs"), list):
        return ["the recorded options or inputs are malformed"]
    if not all(isinstance(i, dict) for i in old["inputs"]):
        return ["the recorded inputs are malformed"]
    if old.get("version") != new["version"]:
        changes.append(f"smile version {old.get('version')} -> {new['version']}")
    old_options = old.get("options") or {}
    for key in sorted(set(old_options) | set(new["options"])):
        if old_options.get(key) != new["options"].get(key):
            changes.append(f"option {key} {old_options.get(key)!r} -> {new['options'].get(key)!r}")
    if old.get("numerics") != new.get("numerics"):  # math library, and threads for --svd exact
        changes.append(f"made with {_numerics(old)}, now {_numerics(new)} (--svd exact's bytes depend on them)")
    if old.get("ranks") != new.get("ranks"):  # allocated (auto) ranks
        changes.append("the allocated ranks differ (same inputs and options, other math library or threads?)")
    if old.get("calibration") != new.get("calibration"):  # --calibrate's prompts file, and the fit's threads
        changes.append(f"the calibration changed ({old.get('calibration')} -> {new.get('calibration')})")
    if old.get("vocabulary") != new.get("vocabulary"):  # tokens added to the base's (an input's tokenizer files)
        changes.append("the output's vocabulary differs (an input's tokenizer changed)")
    old_inputs = old.get("inputs") or []
    if len(old_inputs) != len(new["inputs"]):
        return [*changes, "the list of inputs changed"]
    for before, now in zip(old_inputs, new["inputs"], strict=True):
        if before == now:
            continue
        ref, count = now["ref"], len(changes)
        if before.get("revision") != now["revision"]:
            changes.append(f"{ref}: revision {before.get('revision')} -> {now['revision']}")
        if before.get("config_sha256") != now["config_sha256"]:
            changes.append(f"{ref}: config.json changed")
        files_before = {f.get("name"): f for f in _records(before, "files")}
        files_now = {f["name"]: f for f in now["files"]}
        for name in sorted(set(files_before) | set(files_now)):
            a, b = files_before.get(name), files_now.get(name)
            if a is None or b is None:
                changes.append(f"{ref}: {name} {'appeared' if a is None else 'disappeared'}")
            elif a != b:
                fields = ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                changes.append(f"{ref}: {name} changed ({fields})")
        if len(changes) == count:
            changes.append(f"{ref}: changed")
    return changes


def _numerics(head: dict) -> str:
    numerics = head.get("numerics") or {}
    threads = f", {numerics['threads']} thread(s)" if "threads" in numerics else ""
    return f"{numerics.get('math', 'an unrecorded math library')}{threads}"


def completed_output(out: Path, head: dict) -> dict | None:
    """The manifest of `out` when it already holds this very output (same version, options, inputs, and every
    shard present at its recorded size), else None: `--resume` after the run completed has nothing to do."""
    manifest = read_json_or_none(out / MANIFEST_NAME)
    if manifest is None or describe_changes(manifest, head):
        return None
    for record in _records(manifest):
        path = out / str(record.get("name"))
        if not path.is_file() or path.stat().st_size != record.get("size"):
            return None
    return manifest


def _records(data: dict, key: str = "shards") -> list[dict]:
    """data[key] as a list of records (dicts); a malformed entry is left out (it names no shard to keep)."""
    records = data.get(key)
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
