"""Upscale in parts: several processes (torchrun, a gloo process group) or several jobs (`--shard i/N`), then assemble.

The plan and its shards do not depend on how many parts there are: part i of N writes the output shards
i, i + N, i + 2N, ... (round robin over the plan's shards) into the shared staging folder, and records what it
wrote in a small JSON file there, its journal: `--resume` on a part keeps what an earlier attempt of that part
completed, as for a single run (staging.py). Assembling (runs.assemble: rank 0 after a barrier, or
`smile assemble OUT`) checks that every part is there (finished_parts, parts_shards), writes the index and the
metadata files, and moves the folder into place, so the result is byte for byte that of a single-process run.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from smile_cli.compute import svd_report
from smile_cli.errors import InputError
from smile_cli.files import JSON_ERRORS, file_kind, load_json
from smile_cli.staging import PART_GLOB, check_own_staging, describe_changes, kept_shards
from smile_cli.writer import PARTIAL_SUFFIX, WrittenShard, shard_names

log = logging.getLogger("smile")


def process_group_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def init_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers: no tensors travel between processes


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def owned_shards(num_shards: int, index: int, count: int) -> set[int]:
    return {s for s in range(num_shards) if s % count == index}


def part_record_path(staging: Path, index: int, count: int) -> Path:
    return staging / f".smile-part-{index:05d}-of-{count:05d}.json"


def open_part(
    staging: Path, head: dict, index: int, count: int, num_shards: int, *, resume: bool
) -> dict[str, WrittenShard]:
    """Start part index/count in the shared staging folder: returns the shards kept.

    The part's record (part_record_path) is its journal (staging.Journal): the manifest head and its shards
    complete so far, marked complete when the part is done. With resume, the shards an earlier attempt of this
    part recorded are kept if version, options and inputs are unchanged and each still matches its checksum
    (else InputError, and nothing is touched); the part's other shard files, complete or partial, are deleted.
    Other parts' files are never touched."""
    check_own_staging(staging)
    names = shard_names(num_shards)
    owned = {names[s] for s in owned_shards(num_shards, index, count)}
    record = part_record_path(staging, index, count)
    done = None
    if resume:
        what = f"part {index}/{count} of {staging}"
        done = kept_shards(record, head, owned, what, start_over="run it without --resume")
        if done is None:
            log.info("nothing to resume for part %d/%d: starting it from the beginning", index, count)
        else:
            log.info("resuming part %d/%d: %d of %d shard(s) kept", index, count, len(done), len(owned))
    done = done or {}
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for name in owned - set(done):
            (staging / name).unlink(missing_ok=True)
            (staging / (name + PARTIAL_SUFFIX)).unlink(missing_ok=True)
        return done
    except OSError as e:
        raise InputError(f"{staging}: cannot write the output there: {e.strerror or e}") from e


def finished_parts(out: Path, staging: Path) -> list[dict]:
    """The records of every part of the run in staging, all finished and made with the same options and inputs
    (else InputError; so is a record that cannot be read, naming it)."""
    check_own_staging(staging)
    paths = sorted(staging.glob(PART_GLOB)) if staging.is_dir() and not staging.is_symlink() else []
    records = [_read_record(out, path) for path in paths if not path.name.endswith(".tmp")]
    records = [r for r in records if r.get("complete")]  # a part still running or interrupted is missing
    if not records:
        raise InputError(f"{out}: no parts to assemble (no {staging.name} with finished parts)")
    count = records[0]["part"][1]
    found = sorted(r["part"][0] for r in records if r["part"][1] == count)
    if len(records) != count or found != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        raise InputError(f"{out}: parts {missing} of {count} are missing, unfinished or from another run; run them")
    for r in records[1:]:
        if changes := describe_changes(records[0], r):
            raise InputError(f"{out}: the parts were made with different options or inputs: {'; '.join(changes)}")
    return records


def parts_shards(out: Path, staging: Path, records: list[dict], num_shards: int) -> list[WrittenShard]:
    """Every shard of the output, as the parts recorded it, checked to be there whole."""
    shards = {s["name"]: WrittenShard.of_record(s) for r in records for s in r["shards"]}
    for name in shard_names(num_shards):
        path = staging / name
        if name not in shards or file_kind(path) != "file" or path.stat().st_size != shards[name].size:
            raise InputError(f"{out}: shard {name} is missing or incomplete")
    from smile_cli.inputs.hub_session import VERIFY_STATE  # the parts' digests of Hub inputs

    expected = set(shard_names(num_shards)) | {VERIFY_STATE}
    for path in sorted(staging.iterdir()):
        if path.name not in expected and not path.name.startswith(".smile-part-"):
            raise InputError(
                f"{path}: not written by the parts of this run (only their shards and records belong in "
                f"{staging.name}); remove it and assemble again"
            )
    return [shards[name] for name in shard_names(num_shards)]


def _read_record(out: Path, path: Path) -> dict:
    """A part's record, checked to have the fields assemble reads (InputError naming the file otherwise)."""
    bad = f"{out}: the part record {path.name} cannot be read"
    if file_kind(path) != "file":
        raise InputError(f"{bad} (it is {file_kind(path)}); rerun that part")
    try:
        record = load_json(path)
    except JSON_ERRORS as e:
        raise InputError(f"{bad} ({e}); rerun that part") from e
    if not isinstance(record, dict):
        raise InputError(f"{bad} (not a JSON object); rerun that part")
    if not record.get("complete"):
        return record
    part, shards = record.get("part"), record.get("shards")
    fields_ok = (
        isinstance(part, list)
        and len(part) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in part)
        and 0 <= part[0] < part[1]
        and isinstance(record.get("options"), dict)
        and isinstance(record.get("factorization"), dict)
        and isinstance(shards, list)
        and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("size"), int) and "sha256" in s
            for s in shards
        )
    )
    if not fields_ok:
        raise InputError(f"{bad} (malformed fields); rerun that part")
    return record


def parts_factorization(records: list[dict]) -> dict:
    """The factorization report of the whole run, from the parts' reports."""
    checks = {c["module"]: c for r in records for c in r["factorization"]["error_ratio_checks"]}
    first = records[0]["factorization"]
    methods: dict = {}
    for r in records:
        for method, n in r["factorization"]["methods"].items():
            methods[method] = methods.get(method, 0) + n
    return svd_report(first["svd"], first["randomized"]["seed"], first["device"], methods, list(checks.values()))


def remove_part_records(staging: Path) -> None:
    for path in staging.glob(PART_GLOB):
        path.unlink()


def without_shard(command: str | None) -> str | None:
    """The upscale command line as a single run would have it: `--shard i/N` dropped."""
    if not command:
        return command
    words, kept, skip = shlex.split(command), [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--shard":
            skip = True
        elif not word.startswith("--shard="):
            kept.append(word)
    return shlex.join(kept)
