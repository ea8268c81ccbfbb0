"""How a run writes and finishes, behind one small interface: a single run, or one part of a run in parts.

Both open their staging folder (or resume it), keep a journal of the shards they complete, and finish. A single
run (part 0 of 1) owns its staging folder: it discards it on a failure that --resume cannot continue, and finishes
the output itself (the index, the metadata files, the move into place). A part (--shard i/N, or one process of a
torchrun group: distributed.py) shares the folder: its journal is its part record, and the output is finished by
`assemble` (rank 0 of a group calls it between two barriers), byte for byte as a single run finishes it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from smile_cli.distributed import (
    barrier,
    close_process_group,
    finished_parts,
    init_process_group,
    open_part,
    part_record_path,
    parts_factorization,
    parts_shards,
    process_group_env,
    remove_part_records,
    without_shard,
)
from smile_cli.errors import InputError
from smile_cli.options import UpscaleOptions
from smile_cli.output import PARTIAL_MANIFEST_NAME, manifest_head, write_metadata_files
from smile_cli.plan import LinearRanks, Plan
from smile_cli.planning import load_plan
from smile_cli.staging import (
    Journal,
    check_output_location,
    check_own_staging,
    fresh_staging,
    left_by_interrupted_run,
    move_into_place,
    open_staging,
    staging_path,
)
from smile_cli.writer import WrittenShard, stored_ranks, write_index

log = logging.getLogger("smile")


class SingleRun:
    """Part 0 of 1: its own staging folder, finished into the output by itself."""

    index, count, description = 0, 1, "upscaling"
    written: Plan | None = None  # the plan as finish_staging wrote it (complete)

    def open(self, staging: Path, head: dict, num_shards: int, *, resume: bool, force: bool) -> dict:
        """The staging folder made or resumed; the shards complete from an earlier attempt (by name)."""
        return open_staging(staging, head, num_shards, resume=resume, force=force)

    def journal(self, staging: Path, head: dict, done: dict) -> Journal:
        return Journal(staging / PARTIAL_MANIFEST_NAME, head, done)

    def discard(self, staging: Path) -> None:
        """After a failure that --resume cannot continue: the staging folder goes."""
        shutil.rmtree(staging, ignore_errors=True)

    def complete(self, plan: Plan, staging: Path, shards, journal: Journal, command, factorization: dict) -> None:
        """Every shard written: the index and the metadata files (of the plan as written: finish_staging)."""
        self.written = finish_staging(plan, staging, shards, command, factorization)

    def close(self, plan: Plan, out: Path, staging: Path, shards, stats, started: float, **_) -> dict:
        """The folder moved into place (outside the guarded block: a failure here keeps the complete model in
        staging); the run's summary."""
        move_into_place(staging, out)
        _warn_zero_experts(plan, stats)
        return run_summary(self.written, out, [s.name for s in shards], started, stats.factorization)

    def already_complete(self, summary: dict) -> dict:
        return summary


class PartRun:
    """Part index of count, in the staging folder the parts share; a torchrun group's (group=True) rank 0 also
    makes that folder and assembles the output once every rank is done."""

    def __init__(self, index: int, count: int, group: bool):
        self.index, self.count, self.group = index, count, group
        self.description = f"upscaling part {index}/{count}"

    def open(self, staging: Path, head: dict, num_shards: int, *, resume: bool, force: bool) -> dict:
        if self.group:
            check_own_staging(staging)
            if staging.exists() and not (resume or force):  # every rank decides alike, before any writes
                raise left_by_interrupted_run(staging)
            init_process_group()
            if self.index == 0:
                fresh_staging(staging, keep=resume)
            barrier()
        return open_part(staging, head, self.index, self.count, num_shards, resume=resume)

    def journal(self, staging: Path, head: dict, done: dict) -> Journal:
        path = part_record_path(staging, self.index, self.count)
        return Journal(path, {**head, "part": [self.index, self.count]}, done)

    def discard(self, staging: Path) -> None:
        """The parts share staging: nothing of it is this part's alone to delete."""

    def complete(self, plan: Plan, staging: Path, shards, journal: Journal, command, factorization: dict) -> None:
        """Every shard of this part written: its record says so (assemble reads it)."""
        journal.complete(shards, command=command, factorization=factorization)

    def close(self, plan: Plan, out: Path, staging: Path, shards, stats, started: float, *, command, force, policy):
        summary = plan.summary()
        summary.update(out=str(out), part=f"{self.index}/{self.count}", files=[s.name for s in shards])
        summary.update(factorization=stats.factorization)
        if self.group:
            barrier()
            if self.index == 0:
                summary = assemble(out, command, force=force, **policy)
                summary.update(out=str(out), part=f"0/{self.count}")
            summary["rank"] = self.index
            barrier()
            close_process_group()
        summary["seconds"] = round(time.perf_counter() - started, 3)
        return summary

    def already_complete(self, summary: dict) -> dict:
        return {**summary, "part": f"{self.index}/{self.count}", "rank": self.index} if self.group else summary


def run_mode(part: tuple[int, int] | None) -> SingleRun | PartRun:
    """part=(i, N) (--shard i/N); else a torchrun process group of N processes (this process's rank); else a single
    run."""
    group = process_group_env() if part is None else None
    index, count = part or group or (0, 1)
    return PartRun(index, count, group is not None) if count > 1 else SingleRun()


def assemble(
    out: Path,
    command: str | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Finish a model written in parts into out (the parts' records checked: distributed.py); returns the summary
    of `smile upscale`. out is checked as upscale checks it (staging.check_output_location: an existing folder is
    replaced only with force, and only when it is smile's own), and staging must hold nothing but the parts' files."""
    out = Path(out).expanduser().absolute()
    staging = staging_path(out)
    if out.is_symlink() or out.exists():  # before anything is read: a folder of the user's is never replaced
        check_output_location(out, [], force)
    records = finished_parts(out, staging)
    try:
        table = records[0].get("ranks")  # allocated (auto) ranks: as the parts used them, not allocated again
        ranks = {m: LinearRanks(e["router"], tuple(e["experts"])) for m, e in table.items()} if table else None
        options = UpscaleOptions(**records[0]["options"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{out}: the parts' records hold malformed options or ranks ({first}); rerun the parts") from e
    # the routing as the parts resolved it; the inputs read as the parts read them (policy)
    plan = load_plan(options, ranks=ranks, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    plan = dataclasses.replace(plan, routing_auto=records[0].get("routing_auto"))
    check_output_location(out, plan_inputs(plan), force)
    shards = parts_shards(out, staging, records, plan.num_shards)
    svd = parts_factorization(records)
    command = command if command is not None else without_shard(records[0]["command"])
    written = finish_staging(plan, staging, shards, command, svd, numerics=records[0].get("numerics"))
    remove_part_records(staging)
    move_into_place(staging, out)
    summary = written.summary()
    summary.update(out=str(out), files=[s.name for s in shards], factorization=svd)
    return summary


def finish_staging(plan: Plan, staging: Path, shards: list[WrittenShard], command, svd: dict, numerics=None) -> Plan:
    """The last writes of every run, once all shards are in staging: the index and the metadata files (numerics:
    as the parts recorded them; by default this process's: output.manifest_head). Returns the plan as written:
    with the ranks that the shards record where factors were stored below the planned ranks (the manifest head
    stays the planned one, which a resumed run compares)."""
    head = manifest_head(plan, numerics)
    written = plan.with_stored_ranks(stored_ranks(shards))
    if plan.num_shards > 1:
        write_index(staging, written.tensors, [s.name for s in shards])
    write_metadata_files(written, staging, shards, command, svd=svd, head=head)
    return written


def plan_inputs(plan: Plan) -> list[tuple[str, Path]]:
    """(ref, folder) of every input: what check_output_location must not replace."""
    return [(c.ref, c.path) for c in [plan.base, *plan.experts]]


def run_summary(plan: Plan, out: Path, files: list[str], started: float, svd: dict | None) -> dict:
    summary = plan.summary()
    summary.update(out=str(out), files=files, factorization=svd, seconds=round(time.perf_counter() - started, 3))
    return summary


def _warn_zero_experts(plan: Plan, stats) -> None:
    for expert in plan.experts:
        zero = stats.zero_updates.get(expert.ref, 0)
        if zero and zero == stats.computed_linears and expert.path != plan.base.path:
            log.warning(
                "%s: its update is zero in every upscaled layer (identical to the base): it adds nothing", expert.ref
            )
