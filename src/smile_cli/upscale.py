"""`smile upscale`: resolve inputs -> plan every output tensor -> compute them one by one -> write -> move into place.

The output is built in a staging folder beside the target and renamed to the target only when complete,
so the final name never holds a partial model.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from smile_cli.errors import InputError, Interrupted, SmileError
from smile_cli.factorize import FACTORIZERS, Factors
from smile_cli.options import UpscaleOptions
from smile_cli.output import manifest_head, write_metadata_files
from smile_cli.plan import ROUTER_DTYPE, LinearPlan, Plan, build_plan, linear_outputs
from smile_cli.sources import Checkpoint, open_checkpoint
from smile_cli.staging import Journal, completed_output, open_staging, staging_path
from smile_cli.writer import ShardedWriter

log = logging.getLogger("smile")


class Progress:
    """What upscale reports while it works; the CLI passes a rich bar or plain lines, the library nothing."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


def load_plan(options: UpscaleOptions, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Plan:
    """Open every input (headers only) and plan the output; raises InputError on any bad input."""
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    base = open_checkpoint(options.base, **policy)
    experts = [open_checkpoint(ref, **policy) for ref in options.experts]
    plan = build_plan(options, base, experts)
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
) -> dict:
    """Build the SMILE model described by options into folder `out`; returns a summary dict.

    Bad inputs raise InputError and leave nothing behind. An interruption (KeyboardInterrupt) or a write
    failure (disk full) keeps the staging folder, so that `resume=True` continues where the run stopped.
    """
    started = time.perf_counter()
    out = Path(out).expanduser().absolute()
    plan = load_plan(options, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    head = manifest_head(plan)
    staging = staging_path(out)
    if resume and not staging.exists() and (manifest := completed_output(out, head)):
        log.info("%s is already complete: nothing to resume", out)
        return _summary(plan, out, [s["name"] for s in manifest["shards"]], started)
    _check_output_location(out, plan, force)
    done = open_staging(staging, head, plan.num_shards, resume=resume, force=force)
    progress = progress or Progress()
    writer = None
    try:
        journal = Journal(staging, head, done)
        writer = ShardedWriter(staging, plan.tensors, plan.num_shards, done=done, on_shard=journal.add)
        progress.start(plan.out_bytes, "upscaling")
        execute(plan, writer, progress)
        shards = writer.finish()
        write_metadata_files(plan, staging, shards, command)
        _move_into_place(staging, out)
    except KeyboardInterrupt:
        _abort(writer)
        raise Interrupted(f"interrupted; run the same command with --resume to continue from {staging}") from None
    except OSError as e:  # disk full or another write failure: the complete shards stay, for --resume
        _abort(writer)
        raise SmileError(
            f"{staging}: cannot write: {e.strerror or e}; fix that and run the same command with --resume"
        ) from e
    except BaseException:
        _abort(writer)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        progress.stop()
    _warn_zero_experts(plan)
    return _summary(plan, out, [s.name for s in shards], started)


def _abort(writer: ShardedWriter | None) -> None:
    if writer is not None:
        writer.abort()


def _summary(plan: Plan, out: Path, files: list[str], started: float) -> dict:
    summary = plan.summary()
    summary.update(out=str(out), files=files, seconds=round(time.perf_counter() - started, 3))
    return summary


def _warn_zero_experts(plan: Plan) -> None:
    for expert in plan.experts:
        zero = plan.zero_updates.get(expert.ref, 0)
        if zero and zero == plan.computed_linears and expert.path != plan.base.path:
            log.warning(
                "%s: its update is zero in every upscaled layer (identical to the base): it adds nothing", expert.ref
            )


def execute(plan: Plan, writer: ShardedWriter, progress: Progress) -> None:
    """Produce every planned tensor in order and hand it to the writer."""
    factorize = FACTORIZERS[plan.options.svd]
    for step in plan.steps:
        names = plan.outputs_of(step)
        if all(writer.is_done(name) for name in names):  # kept from an interrupted run (--resume)
            for name in names:
                writer.skip(name)
                progress.advance(plan.nbytes_of(name))
            continue
        if step.linear:
            plan.computed_linears += 1
        if step.copy:
            tensor = _read_finite(plan.base, step.copy)
            if tensor.dtype.is_floating_point:
                tensor = tensor.to(plan.out_dtype)
            writer.write(step.copy, tensor)
            progress.advance(tensor.numel() * tensor.element_size())
        else:
            for name, tensor in upscale_linear(plan, step.linear, factorize):
                writer.write(name, tensor)
                progress.advance(tensor.numel() * tensor.element_size())


def upscale_linear(plan: Plan, lin: LinearPlan, factorize):
    """Yield (name, tensor) for one upscaled linear, in the order of plan.linear_outputs.

    Holds the base weight in float32, one expert's task update at a time and the kept factors of all
    experts; dense experts are yielded as row chunks, one expert after another.
    """
    options, dtype, m = plan.options, plan.out_dtype, lin.module
    num_experts, router_rank, expert_rank = plan.num_experts, options.router_rank, options.expert_rank_value
    names = [name for name, _, _ in linear_outputs(lin, num_experts, router_rank, expert_rank, dtype)]
    base_weight = _read_finite(plan.base, m + ".weight")
    yield names[0], base_weight.to(dtype)
    base_weight = base_weight.float()
    base_bias = None
    if lin.has_bias:
        base_bias = _read_finite(plan.base, m + ".bias")
        yield names[1], base_bias.to(dtype)
        base_bias = base_bias.float()

    routers, svhs, us, biases = [], [], [], []
    for expert in plan.experts:
        delta = _read_finite(expert, m + ".weight").float()
        delta -= base_weight
        if not delta.any():
            plan.zero_updates[expert.ref] = plan.zero_updates.get(expert.ref, 0) + 1
        factors = _factorize_update(delta, plan.factor_rank, factorize)
        if num_experts > 1:
            routers.append(factors.vh[:router_rank])
        if expert_rank > 0:
            svhs.append(factors.s[:expert_rank, None] * factors.vh[:expert_rank])
            us.append(factors.u[:, :expert_rank])
        else:
            yield f"{m}.experts_delta", delta.to(dtype)
        del delta
        if lin.has_bias:
            biases.append(_read_finite(expert, m + ".bias").float() - base_bias)
    if expert_rank > 0:
        yield f"{m}.experts_svh", torch.cat(svhs).to(dtype)
        yield f"{m}.experts_u", torch.cat(us, dim=1).to(dtype)
    if lin.has_bias:
        yield f"{m}.experts_bias", torch.stack(biases).to(dtype)
    if num_experts > 1:
        yield f"{m}.router.weight", torch.cat(routers).to(ROUTER_DTYPE)


def _factorize_update(delta: torch.Tensor, rank: int, factorize) -> Factors:
    """Top `rank` singular triplets of delta; an all-zero update (expert equal to the base in this layer)
    gets all-zero factors: its router rows are zero, so it never wins against a real update, and it adds
    nothing when chosen. (An SVD of zero would return arbitrary directions.)"""
    out_features, in_features = delta.shape
    if rank == 0 or not delta.any():
        return Factors(delta.new_zeros(out_features, rank), delta.new_zeros(rank), delta.new_zeros(rank, in_features))
    return factorize(delta, rank)


def _read_finite(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    tensor = checkpoint.read(name)
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise InputError(f"{checkpoint.ref}: tensor '{name}' holds {bad} NaN or Inf values")
    return tensor


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


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to out; an existing out (allowed by --force) is swapped out first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.smile-replaced"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        staging.rename(out)
    except OSError as e:
        if old is not None:
            old.rename(out)
        raise SmileError(f"{out}: cannot move the finished model into place: {e.strerror or e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
