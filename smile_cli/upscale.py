"""`smile upscale`: resolve inputs -> plan every output tensor -> compute them one by one -> write -> move into place.

The output is built in a staging folder beside the target and renamed to the target only when complete,
so the final name never holds a partial model (staging.py). One run path, stage by stage: plan (planning.py),
open or resume staging, write the shards, finish; the run mode (runs.py: a single run, part 0 of 1, or a part of
several, finished by `assemble` as a single run finishes itself) says how staging is opened, journaled and finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from smile_cli import calibrate
from smile_cli.compute import UpdateFactorizer
from smile_cli.distributed import owned_shards
from smile_cli.errors import InputError, Interrupted, SmileError
from smile_cli.inputs.checks import read_finite
from smile_cli.inputs.experts import BaseLayer, Wanted, kept_rank
from smile_cli.inputs.hub_checkpoint import HubCheckpoint
from smile_cli.inputs.hub_session import HubSession
from smile_cli.layer import smile_layer
from smile_cli.options import UpscaleOptions
from smile_cli.output import manifest_head
from smile_cli.plan import ROUTER_DTYPE, LinearPlan, Plan, Step, is_router_tensor
from smile_cli.planning import load_plan
from smile_cli.prefetch import Prefetcher
from smile_cli.runs import plan_inputs, run_mode, run_summary
from smile_cli.staging import check_output_location, completed_output, staging_path
from smile_cli.vocab import vocab_tensor
from smile_cli.writer import ShardedWriter, WrittenShard, stored_ranks

log = logging.getLogger("smile")


class Progress:
    """What upscale reports while it works; the CLI passes a rich bar or plain lines, the library nothing."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


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
    Every run writes part i of N (runs.py): a single run is part 0 of 1, which owns the staging folder and
    finishes the output itself; part=(i, N), or a torchrun process group of N processes, writes part i into
    the shared staging folder, and the output is finished by `assemble` (rank 0 of a group calls it).
    """
    started = time.perf_counter()
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    mode = run_mode(part)
    out = Path(out).expanduser().absolute()
    plan = load_plan(options, **policy)
    head, staging = manifest_head(plan), staging_path(out)
    if resume and not staging.exists() and (manifest := completed_output(out, head)):
        log.info("%s is already complete: nothing to resume", out)
        shards = [WrittenShard.of_record(s) for s in manifest["shards"]]
        written = plan.with_stored_ranks(stored_ranks(shards))  # as finish_staging wrote it
        return mode.already_complete(run_summary(written, out, [s.name for s in shards], started, None))
    check_output_location(out, plan_inputs(plan), force)
    if plan.calibration is not None:  # before anything is written: a failed fit leaves nothing behind
        plan = _calibrated(plan, parts=mode.count > 1)
    # Hub inputs' checks (hub_session.py): what an earlier attempt left is read before staging is reopened
    hub_session = HubSession(plan, staging, resume=resume, parts=mode.count > 1)
    done = mode.open(staging, head, plan.num_shards, resume=resume, force=force)
    shards, stats = write_shards(plan, mode, staging, head, done, hub_session, progress or Progress(), command)
    return mode.close(plan, out, staging, shards, stats, started, command=command, force=force, policy=policy)


def _calibrated(plan: Plan, parts: bool) -> Plan:
    """The plan with the routers of --calibrate fitted (calibrate.fit_routers, streamed over the base's layers)."""
    if parts:
        raise InputError("--calibrate cannot be combined with --shard or torchrun parts (each part would fit alike)")
    if isinstance(plan.base, HubCheckpoint):
        raise InputError(f"--calibrate reads the base's weights twice; give {plan.base.ref} as a local folder")
    log.info("calibration: fitting routers to %d prompts", len(plan.calibration.ids))
    fitted = calibrate.fit_routers(plan, plan.calibration, read_finite)
    overall = fitted.report["overall"]
    log.info(
        "calibration: leave-one-prompt-out accuracy %.1f%% of prompts, %.1f%% of tokens",
        100 * overall["prompt_accuracy"],
        100 * overall["token_accuracy"],
    )
    return dataclasses.replace(plan, calibrated=fitted)


def write_shards(plan: Plan, mode, staging: Path, head: dict, done: dict, hub_session, progress, command):
    """Write the mode's shards into staging (those complete from an earlier attempt kept), journaled, and complete
    them (mode.complete); returns (the shards, the run's statistics). A failure that --resume cannot continue
    discards what the mode owns (mode.discard)."""
    owned = owned_shards(plan.num_shards, mode.index, mode.count)
    tensors = [t for t in plan.tensors if t.shard in owned]
    try:
        with _resumable(staging, lambda: mode.discard(staging)) as run:
            journal = mode.journal(staging, head, done)
            hub_session.save()

            def on_shard(shard):  # the digests of the Hub bytes it used are saved before the shard counts as done
                hub_session.save()
                journal.add(shard)

            run.writer = ShardedWriter(staging, tensors, plan.num_shards, done=done, on_shard=on_shard)
            progress.start(sum(t.nbytes for t in tensors), mode.description)
            stats = execute(plan, run.writer, progress, owned)
            hub_session.finish()  # every Hub file read to its end and its sha256 matched
            shards = run.writer.finish()
            mode.complete(plan, staging, shards, journal, command, stats.factorization)
    finally:
        progress.stop()
    return shards, stats


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
                if step.linear and factorizer.checks_module(step.linear.module):
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
    base = BaseLayer.reading(plan.base, lin, read_finite, factorizer)
    plan.experts[0].update(base, Wanted(plan.ranks[lin.module].factor_rank_of(0), checked=True))


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
    """Yield (name, tensor) for one upscaled linear, in the order of plan.linear_outputs (layer.smile_layer).

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
        base = BaseLayer(lin, read, lambda: weight, factorizer, bias)
        for index, expert in enumerate(plan.experts):
            checked = index == 0 and factorizer.checks_module(m)  # the quality check measures expert 0's
            wanted = Wanted(ranks.factor_rank_of(index), dense=ranks.experts[0] == 0, held=held, checked=checked)
            update = expert.update(base, wanted)
            if update.zero:
                stats.zero_updates[expert.ref] = stats.zero_updates.get(expert.ref, 0) + 1
            kept.append(kept_rank(ranks.experts[index], update))
            yield update
            del update

    for suffix, tensor in smile_layer(base_weight, base_bias, updates(), ranks):
        if suffix == "experts_svh" and tuple(kept) != ranks.experts:  # every update is computed by now
            stats.stored_ranks[f"{m}.{suffix}"] = {m: list(kept)}
        yield f"{m}.{suffix}", tensor.to("cpu", ROUTER_DTYPE if is_router_tensor(suffix) else plan.out_dtype)
    if plan.calibrated is not None and len(plan.experts) > 1:  # after router.weight, as smile_linear_shapes lays out
        weight, bias = plan.calibrated.routers[m]
        yield f"{m}.router.calibrated_weight", weight
        yield f"{m}.router.calibrated_bias", bias
