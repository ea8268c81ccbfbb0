"""`smile upscale`: resolve inputs -> plan every output tensor -> compute them one by one -> write -> move into place.

The output is built in a staging folder beside the target and renamed to the target only when complete,
so the final name never holds a partial model (staging.py). One run path: a single run is part 0 of 1; a run in
parts (distributed.py) is finished by `assemble`, as a single run finishes itself (finish_staging).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from smile_cli import hub
from smile_cli.compute import UpdateFactorizer
from smile_cli.distributed import (
    barrier,
    close_process_group,
    finished_parts,
    init_process_group,
    open_part,
    owned_shards,
    part_record_path,
    parts_factorization,
    parts_shards,
    process_group_env,
    remove_part_records,
    without_shard,
)
from smile_cli.errors import InputError, Interrupted, SmileError
from smile_cli.experts import kept_rank, open_expert, smile_layer
from smile_cli.kept import compare_kept
from smile_cli.options import UpscaleOptions
from smile_cli.output import PARTIAL_MANIFEST_NAME, manifest_head, write_metadata_files
from smile_cli.plan import ROUTER_DTYPE, ROUTER_WEIGHT, LinearPlan, LinearRanks, Plan, Step, build_plan, clamp_ranks
from smile_cli.prefetch import Prefetcher
from smile_cli.ranks import allocate_ranks
from smile_cli.sources import read_finite
from smile_cli.staging import (
    Journal,
    check_output_location,
    check_own_staging,
    completed_output,
    fresh_staging,
    left_by_interrupted_run,
    move_into_place,
    open_staging,
    staging_path,
)
from smile_cli.vocab import vocab_tensor
from smile_cli.writer import ShardedWriter, WrittenShard, stored_ranks, write_index

log = logging.getLogger("smile")


class Progress:
    """What upscale reports while it works; the CLI passes a rich bar or plain lines, the library nothing."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


def load_plan(
    options: UpscaleOptions, *, allow_pickle: bool = False, trust_remote_code: bool = False, ranks=None
) -> Plan:
    """Open every input (headers only) and plan the output; raises InputError on any bad input. `auto` ranks are
    allocated here (ranks.py: a pass over every update's singular values) unless `ranks` gives the result."""
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, inputs=options.inputs)
    base = hub.open_input(options.base, **policy)
    experts = [open_expert(ref, **policy) for ref in options.experts]
    plan = build_plan(options, base, experts)
    if plan.budgeted:
        plan = plan.with_ranks(ranks or allocate_ranks(plan))
    plan = clamp_ranks(plan)
    plan = dataclasses.replace(plan, kept_differences=compare_kept(plan))
    for warning in plan.warnings:
        log.warning(warning)
    return plan


def upscale(
    options: UpscaleOptions,
    out: Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    part: tuple[int, int] | None = None,
) -> dict:
    """Build the SMILE model described by options into folder `out`; returns a summary dict.

    Bad inputs raise InputError and leave nothing behind. An interruption (KeyboardInterrupt) or a write
    failure (disk full) keeps the staging folder, so that `resume=True` continues where the run stopped.
    Every run writes part i of N (distributed.py): a single run is part 0 of 1, which owns the staging folder
    and finishes the output itself; part=(i, N), or a torchrun process group of N processes, writes part i into
    the shared staging folder, and the output is finished by `assemble` (rank 0 of a group calls it).
    """
    started = time.perf_counter()
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    group = process_group_env() if part is None else None
    index, count = part or group or (0, 1)
    out = Path(out).expanduser().absolute()
    plan = load_plan(options, **policy)
    head, staging = manifest_head(plan), staging_path(out)
    if resume and not staging.exists() and (manifest := completed_output(out, head)):
        log.info("%s is already complete: nothing to resume", out)
        shards = [WrittenShard.of_record(s) for s in manifest["shards"]]
        summary = _summary(plan.with_stored_ranks(stored_ranks(shards)), out, [s.name for s in shards], started, None)
        return {**summary, "part": f"{index}/{count}", "rank": index} if group else summary
    check_output_location(out, _inputs(plan), force)
    hub.prepare(plan, parts=count > 1)
    # Hub inputs' checks (hub.py): what an earlier attempt left is read before staging is reopened
    verification = hub.Verification(plan, staging, resume and count == 1)
    if count == 1:
        done = open_staging(staging, head, plan.num_shards, resume=resume, force=force)
        journal_path, journal_head = staging / PARTIAL_MANIFEST_NAME, head
    else:
        if group:
            check_own_staging(staging)
            if staging.exists() and not (resume or force):  # every rank decides alike, before any writes
                raise left_by_interrupted_run(staging)
            init_process_group()
            if index == 0:
                fresh_staging(staging, keep=resume)
            barrier()
        done = open_part(staging, head, index, count, plan.num_shards, resume=resume)
        journal_path, journal_head = part_record_path(staging, index, count), {**head, "part": [index, count]}
    owned = owned_shards(plan.num_shards, index, count)
    tensors = [t for t in plan.tensors if t.shard in owned]
    progress = progress or Progress()
    # a single run's staging is its own: discarded on a failure that --resume cannot continue; parts share it
    discard = (lambda: shutil.rmtree(staging, ignore_errors=True)) if count == 1 else (lambda: None)
    try:
        with _resumable(staging, discard) as run:
            journal = Journal(journal_path, journal_head, done)
            if count == 1:
                verification.save()

            def on_shard(shard):  # the digests of the Hub bytes it used are saved before the shard counts as done
                if count == 1:
                    verification.save()
                journal.add(shard)

            run.writer = ShardedWriter(staging, tensors, plan.num_shards, done=done, on_shard=on_shard)
            progress.start(
                sum(t.nbytes for t in tensors), "upscaling" + (f" part {index}/{count}" if count > 1 else "")
            )
            stats = execute(plan, run.writer, progress, owned)
            verification.finish(keep_state=count > 1)  # every Hub file read to its end and its sha256 matched
            shards = run.writer.finish()
            if count == 1:
                written = finish_staging(plan, staging, shards, command, stats.factorization)
            else:
                journal.complete(shards, command=command, factorization=stats.factorization)
    finally:
        progress.stop()
    if count == 1:
        move_into_place(staging, out)  # outside: a failure here keeps the complete model in staging
        _warn_zero_experts(plan, stats)
        return _summary(written, out, [s.name for s in shards], started, stats.factorization)
    summary = plan.summary()
    summary.update(out=str(out), part=f"{index}/{count}", files=[s.name for s in shards])
    summary.update(factorization=stats.factorization)
    if group:
        barrier()
        if index == 0:
            summary = assemble(out, command, force=force, **policy)
            summary.update(out=str(out), part=f"0/{count}")
        summary["rank"] = index
        barrier()
        close_process_group()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


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
    check_output_location(out, _inputs(plan), force)
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


def _inputs(plan: Plan) -> list[tuple[str, Path]]:
    return [(c.ref, c.path) for c in [plan.base, *plan.experts]]


@contextlib.contextmanager
def _resumable(staging: Path, discard):
    """Around the writing of shards (set .writer of what it yields once made): an interruption (Ctrl-C, SIGTERM)
    or a write failure (disk full) keeps the complete shards and their journal, for --resume; any other error
    calls discard(). The shard being written is deleted in every case."""
    run = SimpleNamespace(writer=None)
    try:
        yield run
    except KeyboardInterrupt:
        _abort(run.writer)
        raise Interrupted(f"interrupted; run the same command with --resume to continue from {staging}") from None
    except OSError as e:
        _abort(run.writer)
        raise SmileError(
            f"{staging}: cannot write: {e.strerror or e}; fix that and run the same command with --resume"
        ) from e
    except BaseException:
        _abort(run.writer)
        discard()
        raise


def _abort(writer: ShardedWriter | None) -> None:
    if writer is not None:
        writer.abort()


def _summary(plan: Plan, out: Path, files: list[str], started: float, svd: dict | None) -> dict:
    summary = plan.summary()
    summary.update(out=str(out), files=files, factorization=svd, seconds=round(time.perf_counter() - started, 3))
    return summary


def _warn_zero_experts(plan: Plan, stats: RunStats) -> None:
    for expert in plan.experts:
        zero = stats.zero_updates.get(expert.ref, 0)
        if zero and zero == stats.computed_linears and expert.path != plan.base.path:
            log.warning(
                "%s: its update is zero in every upscaled layer (identical to the base): it adds nothing", expert.ref
            )


@dataclass
class RunStats:
    """What execute measured: the factorization report, how many linears it computed, per expert (ref) in how
    many of them its update was zero, and the stored ranks of a module whose factors came out below the planned
    ranks, by the name of its experts_svh, until the writer takes them with that tensor."""

    factorization: dict = field(default_factory=dict)
    computed_linears: int = 0
    zero_updates: dict[str, int] = field(default_factory=dict)
    stored_ranks: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def execute(plan: Plan, writer: ShardedWriter, progress: Progress, shards: set[int] | None = None) -> RunStats:
    """Produce every planned tensor (only those of `shards`, when given) in order and hand it to the writer.

    Steps whose tensors all lie in shards kept from an interrupted run (--resume) are skipped. Input tensors
    are read ahead by a background thread (bounded: see prefetch.py). Returns the run's statistics: the
    factorization report (method, device, measured error ratios) and the zero updates met."""
    stats = RunStats()
    checked = {module: plan.ranks[module].router for module in first_of_each_shape(plan)}
    factorizer = UpdateFactorizer(plan.options.svd, plan.options.seed, plan.options.device, check_modules=checked)
    steps = steps_for_shards(plan, shards)
    wanted = None if shards is None else {t.name for t in plan.tensors if t.shard in shards}

    def written(step: Step) -> list[str]:  # its outputs that this writer writes (another part's are dropped)
        return [name for name in plan.outputs_of(step) if wanted is None or name in wanted]

    kept = {id(step) for step in steps if all(writer.is_done(name) for name in written(step))}
    keys = (key for step in steps if id(step) not in kept for key in step_reads(plan, step))
    prefetch = Prefetcher(keys, read_finite, depth=int(os.environ.get("SMILE_PREFETCH_DEPTH", "2")))
    try:
        for step in steps:
            if id(step) in kept:
                if step.linear and step.linear.module in factorizer.check_modules:
                    _check_only(plan, step.linear, factorizer)  # the card reports it, resumed or not
                for name in written(step):
                    writer.skip(name)
                    progress.advance(plan.nbytes_of(name))
                continue
            if step.linear:
                stats.computed_linears += 1
            for name, tensor in step_outputs(plan, step, prefetch.get, factorizer, stats):
                ranks = stats.stored_ranks.pop(name, None)
                if wanted is None or name in wanted:
                    writer.write(name, tensor, shrink=plan.clamps_at_factorization, ranks=ranks)
                    progress.advance(tensor.numel() * tensor.element_size())
    finally:
        prefetch.close()
    stats.factorization = factorizer.report()
    return stats


def _check_only(plan: Plan, lin: LinearPlan, factorizer) -> None:
    """Factorize expert 0's update of lin only for the factorizer's quality check (its output is kept; a LoRA
    expert's factors are exact and never checked)."""
    base_weight = functools.cache(lambda: factorizer.to_device(read_finite(plan.base, lin.module + ".weight")).float())
    plan.experts[0].update(lin, plan.ranks[lin.module].factor_rank_of(0), read_finite, base_weight, factorizer, 0)


def step_outputs(plan: Plan, step: Step, read, factorizer, stats: RunStats):
    """Yield (name, tensor) for one step; read(checkpoint, name) gives inputs in the order of step_reads."""
    if step.copy:
        tensor = read(plan.base, step.copy)
        if step.rows is not None:  # rows following the output's vocabulary (vocab.py)
            tensor = vocab_tensor(plan, step.copy, tensor, plan.out_dtype)
        yield step.copy, tensor.to(plan.out_dtype) if tensor.dtype.is_floating_point else tensor
    else:
        yield from upscale_linear(plan, step.linear, factorizer, read, stats)


def step_reads(plan: Plan, step: Step):
    """(checkpoint, tensor name) of every input a step reads, in the order it reads them."""
    if step.copy:
        return [(plan.base, step.copy)]
    m, bias = step.linear.module, step.linear.has_bias
    reads = [(plan.base, m + ".weight")] + ([(plan.base, m + ".bias")] if bias else [])
    return reads + [read for expert in plan.experts for read in expert.reads(step.linear)]


def steps_for_shards(plan: Plan, shards: set[int] | None) -> list[Step]:
    """The steps that produce at least one tensor of `shards` (all steps when None)."""
    if shards is None:
        return list(plan.steps)
    tensors = iter(plan.tensors)
    chosen = []
    for step in plan.steps:
        if step.copy:
            count = 1
        else:
            count = len(plan.outputs_of(step))
        if {next(tensors).shard for _ in range(count)} & shards:
            chosen.append(step)
    return chosen


def first_of_each_shape(plan: Plan) -> set[str]:
    """The sample of linears whose factorization error is measured (exact singular values: seconds each for
    large matrices): the first upscaled linear of each shape, a wide and a tall matrix counted as one shape."""
    firsts: dict[tuple[int, int], str] = {}
    for lin in plan.linears:
        firsts.setdefault(tuple(sorted((lin.out_features, lin.in_features))), lin.module)
    return set(firsts.values())


def upscale_linear(plan: Plan, lin: LinearPlan, factorizer, read, stats: RunStats):
    """Yield (name, tensor) for one upscaled linear, in the order of plan.linear_outputs (experts.smile_layer).

    Holds the base weight (as read and in float32 on the compute device), one expert's task update at a time
    and the kept factors of all experts; dense experts are yielded whole, one expert after another.
    """
    m, ranks = lin.module, plan.ranks[lin.module]
    base_weight = read(plan.base, m + ".weight")
    base_bias = read(plan.base, m + ".bias") if lin.has_bias else None

    held, kept = plan.clamps_at_factorization, []

    def updates():  # lazily: the shared weight is written before the first update is computed
        weight = factorizer.to_device(base_weight).float()
        bias = base_bias.float() if base_bias is not None else None
        for index, expert in enumerate(plan.experts):
            rank, dense = ranks.factor_rank_of(index), ranks.experts[0] == 0
            update = expert.update(
                lin, rank, read, lambda: weight, factorizer, index, dense=dense, base_bias=bias, held=held
            )
            if update.zero:
                stats.zero_updates[expert.ref] = stats.zero_updates.get(expert.ref, 0) + 1
            kept.append(kept_rank(ranks.experts[index], update))
            yield update
            del update

    for suffix, tensor in smile_layer(base_weight, base_bias, updates(), ranks):
        if suffix == "experts_svh" and tuple(kept) != ranks.experts:  # every update is computed by now
            stats.stored_ranks[f"{m}.{suffix}"] = {m: list(kept)}
        yield f"{m}.{suffix}", tensor.to("cpu", ROUTER_DTYPE if suffix == ROUTER_WEIGHT else plan.out_dtype)
