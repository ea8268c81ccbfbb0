"""`smile upscale`: resolve inputs -> plan every output tensor -> compute them one by one -> write -> move into place.

The output is built in a staging folder beside the target and renamed to the target only when complete,
so the final name never holds a partial model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from smile_cli.compute import UpdateFactorizer, factorize_update
from smile_cli.distributed import (
    assemble,
    barrier,
    close_process_group,
    init_process_group,
    open_part,
    owned_shards,
    process_group_env,
)
from smile_cli.errors import InputError, Interrupted, SmileError
from smile_cli.kept import compare_kept
from smile_cli.lora import LoraAdapter
from smile_cli.options import UpscaleOptions
from smile_cli.output import PARTIAL_MANIFEST_NAME, manifest_head, write_metadata_files
from smile_cli.plan import ROUTER_DTYPE, LinearPlan, Plan, Step, build_plan, linear_outputs
from smile_cli.prefetch import Prefetcher
from smile_cli.ranks import allocate_ranks
from smile_cli.sources import open_checkpoint, read_finite
from smile_cli.staging import Journal, completed_output, left_by_interrupted_run, open_staging, staging_path
from smile_cli.vocab import vocab_tensor
from smile_cli.writer import ShardedWriter

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
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    base = open_checkpoint(options.base, **policy)
    experts = [open_checkpoint(ref, **policy) for ref in options.experts]
    plan = build_plan(options, base, experts)
    if plan.budgeted:
        plan = plan.with_ranks(ranks or allocate_ranks(plan))
    plan.kept_differences = compare_kept(plan)
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
    part=(i, N), or a torchrun process group of N processes: write only part i (see distributed.py).
    """
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if part is not None or process_group_env() is not None:
        return upscale_part(
            options, out, force=force, resume=resume, progress=progress, command=command, part=part, policy=policy
        )
    started = time.perf_counter()
    out, plan, head, staging, complete = _open_run(options, out, resume, policy, started)
    if complete:
        return complete
    _check_output_location(out, plan, force)
    done = open_staging(staging, head, plan.num_shards, resume=resume, force=force)
    progress = progress or Progress()
    try:
        with _resumable(staging, discard=lambda: shutil.rmtree(staging, ignore_errors=True)) as run:
            journal = Journal(staging / PARTIAL_MANIFEST_NAME, head, done)
            run.writer = ShardedWriter(staging, plan.tensors, plan.num_shards, done=done, on_shard=journal.add)
            progress.start(plan.out_bytes, "upscaling")
            svd = execute(plan, run.writer, progress)
            shards = run.writer.finish()
            write_metadata_files(plan, staging, shards, command, svd=svd)
    finally:
        progress.stop()
    _move_into_place(staging, out)  # outside: a failure here keeps the complete model in staging
    _warn_zero_experts(plan)
    return _summary(plan, out, [s.name for s in shards], started, svd)


def _open_run(options, out, resume: bool, policy: dict, started: float):
    """(out as an absolute path, plan, manifest head, staging folder, summary or None): the summary when resume
    finds out already complete, with nothing to do."""
    out = Path(out).expanduser().absolute()
    plan = load_plan(options, **policy)
    head = manifest_head(plan)
    staging = staging_path(out)
    complete = None
    if resume and not staging.exists() and (manifest := completed_output(out, head)):
        log.info("%s is already complete: nothing to resume", out)
        complete = _summary(plan, out, [s["name"] for s in manifest["shards"]], started, None)
    return out, plan, head, staging, complete


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


def _warn_zero_experts(plan: Plan) -> None:
    for expert in plan.experts:
        zero = plan.zero_updates.get(expert.ref, 0)
        if zero and zero == plan.computed_linears and expert.path != plan.base.path:
            log.warning(
                "%s: its update is zero in every upscaled layer (identical to the base): it adds nothing", expert.ref
            )


def upscale_part(options, out, *, force, resume, progress, command, part, policy) -> dict:
    """Write part i of N of the output into the shared staging folder; the last step (assembling) is done by
    rank 0 of a process group after a barrier, or by `smile assemble` after job arrays. With resume, the part
    keeps the shards an earlier attempt of it completed (distributed.open_part)."""
    started = time.perf_counter()
    group = process_group_env() if part is None else None
    index, count = part or group
    out, plan, head, staging, complete = _open_run(options, out, resume, policy, started)
    if complete:
        return {**complete, "part": f"{index}/{count}", "rank": index} if group else complete
    _check_output_location(out, plan, force)
    if group and staging.exists() and not (resume or force):  # every rank decides alike, before any writes
        raise left_by_interrupted_run(staging)
    if group:
        init_process_group()
        if index == 0:
            _make_staging(staging, keep=resume)
        barrier()
    done, journal = open_part(staging, head, index, count, plan.num_shards, resume=resume)
    owned = owned_shards(plan.num_shards, index, count)
    tensors = [t for t in plan.tensors if t.shard in owned]
    progress = progress or Progress()
    try:
        with _resumable(staging, discard=lambda: None) as run:  # other parts share staging: it stays
            run.writer = ShardedWriter(staging, tensors, plan.num_shards, done=done, on_shard=journal.add)
            progress.start(sum(t.nbytes for t in tensors), f"upscaling part {index}/{count}")
            svd = execute(plan, run.writer, progress, owned)
            shards = run.writer.finish(index=False)
            journal.complete(shards, command=command, factorization=svd)
    finally:
        progress.stop()
    summary = plan.summary()
    summary.update(out=str(out), part=f"{index}/{count}", files=[s.name for s in shards], factorization=svd)
    if group:
        barrier()
        if index == 0:
            summary = assemble(out, command)
            summary.update(out=str(out), part=f"0/{count}")
        summary["rank"] = index
        barrier()
        close_process_group()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def execute(plan: Plan, writer: ShardedWriter, progress: Progress, shards: set[int] | None = None) -> dict:
    """Produce every planned tensor (only those of `shards`, when given) in order and hand it to the writer.

    Steps whose tensors all lie in shards kept from an interrupted run (--resume) are skipped. Input tensors
    are read ahead by a background thread (bounded: see prefetch.py). Returns the factorization report
    (method, device, measured error ratios)."""
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
                plan.computed_linears += 1
            for name, tensor in step_outputs(plan, step, prefetch.get, factorizer):
                if wanted is None or name in wanted:
                    writer.write(name, tensor)
                    progress.advance(tensor.numel() * tensor.element_size())
    finally:
        prefetch.close()
    return factorizer.report()


def _check_only(plan: Plan, lin: LinearPlan, factorizer) -> None:
    """Factorize expert 0's update of lin only for the factorizer's quality check (its output is kept)."""
    if isinstance(plan.experts[0], LoraAdapter):  # its factors are exact: nothing to check
        return
    delta = factorizer.to_device(read_finite(plan.experts[0], lin.module + ".weight")).float()
    delta -= factorizer.to_device(read_finite(plan.base, lin.module + ".weight")).float()
    factorize_update(delta, plan.ranks[lin.module].factor_rank_of(0), lambda d, r: factorizer(d, r, lin.module, 0))


def step_outputs(plan: Plan, step: Step, read, factorizer):
    """Yield (name, tensor) for one step; read(checkpoint, name) gives inputs in the order of step_reads."""
    if step.copy:
        tensor = read(plan.base, step.copy)
        if step.rows is not None:  # rows following the output's vocabulary (vocab.py)
            tensor = vocab_tensor(plan, step.copy, tensor, plan.out_dtype)
        yield step.copy, tensor.to(plan.out_dtype) if tensor.dtype.is_floating_point else tensor
    else:
        yield from upscale_linear(plan, step.linear, factorizer, read)


def step_reads(plan: Plan, step: Step):
    """(checkpoint, tensor name) of every input a step reads, in the order it reads them."""
    if step.copy:
        return [(plan.base, step.copy)]
    m, bias = step.linear.module, step.linear.has_bias
    reads = [(plan.base, m + ".weight")] + ([(plan.base, m + ".bias")] if bias else [])
    for expert in plan.experts:
        if isinstance(expert, LoraAdapter):
            reads += expert.reads(m)
            continue
        reads += [(expert, m + ".weight")] + ([(expert, m + ".bias")] if bias else [])
    return reads


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


def upscale_linear(plan: Plan, lin: LinearPlan, factorizer, read=None):
    """Yield (name, tensor) for one upscaled linear, in the order of plan.linear_outputs.

    Holds the base weight in float32 (on the compute device), one expert's task update at a time and the kept
    factors of all experts; dense experts are yielded whole, one expert after another.
    """
    read = read or read_finite
    dtype, m, ranks = plan.out_dtype, lin.module, plan.ranks[lin.module]
    num_experts, dense = plan.num_experts, ranks.experts[0] == 0
    names = [name for name, _, _ in linear_outputs(lin, ranks, dtype)]
    base_weight = read(plan.base, m + ".weight")
    yield names[0], base_weight.to(dtype)
    base_weight = factorizer.to_device(base_weight).float()
    base_bias = None
    if lin.has_bias:
        base_bias = read(plan.base, m + ".bias")
        yield names[1], base_bias.to(dtype)
        base_bias = base_bias.float()

    routers, svhs, us, biases = [], [], [], []
    for index, expert in enumerate(plan.experts):
        if isinstance(expert, LoraAdapter):  # exact factors from lora_A / lora_B: see lora.py
            shape = (lin.out_features, lin.in_features)
            factors, delta = expert.update(m, ranks.factor_rank_of(index), shape, read, dense=dense)
            if m not in expert.modules:
                plan.zero_updates[expert.ref] = plan.zero_updates.get(expert.ref, 0) + 1
        else:
            delta = factorizer.to_device(read(expert, m + ".weight")).float()
            delta -= base_weight
            rank = ranks.factor_rank_of(index)
            factors, zero = factorize_update(delta, rank, lambda d, r, i=index: factorizer(d, r, m, i))
            if zero:
                plan.zero_updates[expert.ref] = plan.zero_updates.get(expert.ref, 0) + 1
        if num_experts > 1:
            routers.append(factors.vh[: ranks.router])
        if not dense:
            k = ranks.experts[index]
            svhs.append(factors.s[:k, None] * factors.vh[:k])
            us.append(factors.u[:, :k])
        else:
            yield f"{m}.experts_delta", delta.to("cpu", dtype)
        del delta
        if lin.has_bias and isinstance(expert, LoraAdapter):
            biases.append(expert.bias_update(m, lin.out_features, read))
        elif lin.has_bias:
            biases.append(read(expert, m + ".bias").float() - base_bias)
    if not dense:
        yield f"{m}.experts_svh", torch.cat(svhs).to(dtype)
        yield f"{m}.experts_u", torch.cat(us, dim=1).to(dtype)
    if lin.has_bias:
        yield f"{m}.experts_bias", torch.stack(biases).to(dtype)
    if num_experts > 1:
        yield f"{m}.router.weight", torch.cat(routers).to(ROUTER_DTYPE)


def _check_output_location(out: Path, plan: Plan, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise InputError(f"{out}: exists and is not empty (use --force to replace it)")
    resolved = out.resolve()
    for checkpoint in [plan.base, *plan.experts]:
        source = checkpoint.path.resolve()
        if resolved == source or source in resolved.parents:
            raise InputError(f"{out}: the output folder lies inside the input {checkpoint.ref}")
        if resolved in source.parents:
            raise InputError(f"{out}: the output folder contains the input {checkpoint.ref}")


def _make_staging(staging: Path, keep: bool = False) -> None:
    """A fresh staging folder for a process group (keep: the one there, if any, for the ranks to resume)."""
    try:
        if staging.exists() and not keep:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=keep)
    except OSError as e:
        raise InputError(f"{staging.parent}: cannot write the output there: {e.strerror or e}") from e


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to out; an existing out (allowed by --force) is swapped out first."""
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.smile-replaced"
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
