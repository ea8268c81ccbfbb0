"""Resolve and plan: open every input (headers only), check it, and plan the output in one pass; the stage every
command that builds or describes a SMILE model starts with (upscale, assemble, --dry-run, inspect).

survey: the checks (the expert list, the base complete, each expert against the base, the ranks given, the
vocabulary), the upscaled linears, the output dtype and every step, with the warnings each check returns; then
every module's ranks (decide_ranks: given, allocated, clamped to a LoRA adapter's r); then the layout (every tensor
and its shard), once. Reads tensor data where the plan depends on it: the non-upscaled tensors the experts hold,
compared with the base's (kept.py), the --calibrate prompts' tokens, and with `auto` ranks every update's singular
values (ranks.py). The plan's types and layout: plan.py. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from smile_cli import calibrate, defaults
from smile_cli.architecture import Architecture, read_architecture
from smile_cli.errors import InputError
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.experts import open_expert, open_input
from smile_cli.kept import compare_kept
from smile_cli.naming import module_kind, natural_key
from smile_cli.options import AUTO_ROUTING, UpscaleOptions
from smile_cli.plan import (
    OUTPUT_DTYPES,
    LinearPlan,
    LinearRanks,
    Plan,
    Step,
    Survey,
    check_ranks,
    output_tensors,
)
from smile_cli.ranks import allocate_ranks
from smile_cli.targets import select_targets
from smile_cli.vocab import Vocabulary, plan_vocabulary
from smile_cli.writer import assign_shards

log = logging.getLogger("smile")


def load_plan(
    options: UpscaleOptions, *, allow_pickle: bool = False, trust_remote_code: bool = False, ranks=None
) -> Plan:
    """Open every input (headers only) and plan the output; raises InputError on any bad input. `auto` ranks are
    allocated here (ranks.py: a pass over every update's singular values) unless `ranks` gives the result."""
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, inputs=options.inputs)
    base = open_input(options.base, **policy)
    experts = [open_expert(ref, **policy) for ref in options.experts]
    plan = build_plan(options, base, experts, ranks)
    for warning in plan.warnings:
        log.warning(warning)
    return plan


def build_plan(options: UpscaleOptions, base: Checkpoint, experts: list, ranks=None) -> Plan:
    """The plan of opened inputs: survey them, decide every module's ranks (`ranks`: allocated ones, as an earlier
    run allocated them), compare the kept tensors, read the calibration prompts, lay the output out."""
    survey = survey_inputs(options, base, experts)
    ranks, clamped = decide_ranks(survey, ranks)
    kept, kept_warnings = compare_kept(survey)
    # --calibrate: the example prompts, checked; their routers are fitted by upscale (and laid out now)
    calibration = calibrate.read_calibration(options.calibrate, survey) if options.calibrate is not None else None
    entries = output_tensors(survey.base, survey.steps, ranks, survey.out_dtype, calibration is not None)
    tensors = assign_shards(entries, options.max_shard_size)
    surveyed = {f.name: getattr(survey, f.name) for f in dataclasses.fields(Survey)}
    surveyed["warnings"] = [*survey.warnings, *kept_warnings]
    return Plan(
        **surveyed,
        ranks=ranks,
        tensors=tensors,
        num_shards=tensors[-1].shard + 1 if tensors else 0,
        clamped=clamped,
        kept_differences=kept,
        calibration=calibration,
    )


def survey_inputs(options: UpscaleOptions, base: Checkpoint, experts: list) -> Survey:
    """Check the inputs against each other and find what the output holds apart from its ranks (see Survey)."""
    warnings: list[str] = [w for c in [base, *experts] for w in c.warnings]
    architecture = read_architecture(base.ref, base.config, base.tensors.keys())
    options, routing_auto = resolve_routing(options, architecture)
    warnings += _check_expert_list(base, experts)
    warnings += _check_base_complete(base, architecture)
    linears = _find_linears(base, architecture, options.target)
    aligned = []  # the experts with their tensor names matched to the base's (a renamed copy, where needed)
    for expert in experts:
        expert, renamed = expert.aligned_to(base, linears[0].module + ".weight")
        warnings += renamed + expert.check_against(base, linears)
        aligned.append(expert)
    experts = aligned
    warnings += _check_ranks(options, linears, len(experts))
    vocabulary, vocabulary_warnings = plan_vocabulary(options, base, experts, architecture)
    warnings += vocabulary_warnings
    return Survey(
        options=options,
        base=base,
        experts=experts,
        architecture=architecture,
        out_dtype=_output_dtype(options, base, linears),
        steps=_steps(base, linears, vocabulary),
        base_params=sum(math.prod(info.shape) for info in base.tensors.values()),
        vocabulary=vocabulary,
        warnings=warnings,
        routing_auto=routing_auto,
    )


def decide_ranks(survey: Survey, allocated: dict[str, LinearRanks] | None = None):
    """(every module's ranks, whether a given expert rank was clamped). `auto` ranks: `allocated` when given, else
    ranks.allocate_ranks. Given ranks are the options' everywhere, each expert's clamped to the rank its update
    holds where that is known without reading a weight (a LoRA adapter's r, per module: Expert.update_rank): rows
    beyond it would be all zeros, and the model computes the same function without them. No clamp applies with
    dense experts, or where every update holds the given rank (full fine-tunes: their update rank is known only
    from the spectrum, and they are clamped as they are factorized: experts.kept_rank, Plan.with_stored_ranks)."""
    if survey.budgeted:
        ranks = allocated or allocate_ranks(survey)
        check_ranks(ranks, survey.linears, survey.num_experts)
        return ranks, False
    given = uniform_ranks(survey.options, survey.num_experts)
    uniform = {lin.module: given for lin in survey.linears}
    if survey.options.dense_experts:
        return uniform, False
    clamped = {
        lin.module: LinearRanks(
            given.router,
            tuple(
                k if held is None else max(1, min(k, held))  # one row even for a zero update
                for k, held in zip(given.experts, (e.update_rank(lin) for e in survey.experts), strict=True)
            ),
        )
        for lin in survey.linears
    }
    if all(r == given for r in clamped.values()):
        return uniform, False
    check_ranks(clamped, survey.linears, survey.num_experts)
    return clamped, True


def resolve_routing(options: UpscaleOptions, architecture: Architecture) -> tuple[UpscaleOptions, str | None]:
    """options with `--routing auto` replaced by the architecture's routing (defaults.CAUSAL_LM_ROUTING for a
    decoder-only causal LM, faithful for any other: modeling_smile.prompt_routing_support), and why auto chose it
    (None when the routing was given). InputError for a prompt mode the architecture cannot route."""
    supported, why = architecture.prompt_routing
    if options.calibrate is not None or options.routing in ("calibrated", "calibrated-prompt"):
        return _calibrated_routing(options, supported, why)
    if options.routing == AUTO_ROUTING:
        if not supported:
            return options.model_copy(update={"routing": "faithful"}), why
        chosen = defaults.CAUSAL_LM_ROUTING
        return options.model_copy(update={"routing": chosen}), f"{why}; {defaults.CAUSAL_LM_ROUTING_WHY}"
    if options.routing != "faithful" and not supported:
        raise InputError(
            f"--routing {options.routing} needs a decoder-only causal LM ({why}); use --routing faithful or auto"
        )
    return options, None


def _calibrated_routing(options: UpscaleOptions, supported: bool, why: str) -> tuple[UpscaleOptions, str | None]:
    """--calibrate: auto routes with the fitted routers ("calibrated"); a given mode is kept (the routers are stored
    either way). "calibrated" without --calibrate, or a calibration of a model that is not a causal LM: InputError."""
    if options.calibrate is None:
        raise InputError(
            f"--routing {options.routing} needs --calibrate FILE.yaml (the example prompts to fit routers to)"
        )
    if not supported:
        raise InputError(f"--calibrate needs a decoder-only causal LM ({why})")
    if options.routing == AUTO_ROUTING:
        return options.model_copy(update={"routing": "calibrated"}), "--calibrate: routers fitted to example prompts"
    return options, None


def uniform_ranks(options: UpscaleOptions, num_experts: int) -> LinearRanks:
    """The ranks given options give every module (no `auto`: those are allocated)."""
    return LinearRanks(0 if num_experts == 1 else options.router_rank, (options.expert_rank_value,) * num_experts)


def _check_expert_list(base: Checkpoint, experts: list) -> list[str]:
    """InputError without experts; warnings for an expert that is the base, or one given twice."""
    warnings = []
    if not experts:
        raise InputError("no experts given (--experts REF,REF,...)")
    seen: dict = {}
    for expert in experts:
        if expert.path == base.path:
            warnings.append(f"{expert.ref}: is the base model itself; its updates are all zero")
        if expert.path in seen:
            warnings.append(f"{expert.ref}: given twice (same as {seen[expert.path]})")
        seen[expert.path] = expert.ref
    return warnings


def _find_linears(base: Checkpoint, architecture: Architecture, patterns: list[str] | None) -> list[LinearPlan]:
    """The nn.Linear modules chosen by --target (targets.py), with their shapes from the base's tensors."""
    linears = []
    for module in select_targets(base.ref, architecture, patterns):
        weight = module + ".weight"
        if weight in architecture.tied:
            raise InputError(
                f"{base.ref}: '{module}' shares its weight with '{architecture.tied[weight]}' (tied embeddings) "
                "and cannot be upscaled; leave it out of --target"
            )
        out_features, in_features = base.tensors[weight].shape
        linears.append(LinearPlan(module, out_features, in_features, module + ".bias" in base.tensors))
    return sorted(linears, key=lambda lin: natural_key(lin.module))


def _check_base_complete(base: Checkpoint, architecture: Architecture) -> list[str]:
    """Every parameter of the architecture is in the base with the shape its config implies: a missing one
    would otherwise be initialised at random when the output is loaded."""
    for name, shape in architecture.parameters.items():
        info = base.tensors.get(name)
        if info is None:
            raise InputError(f"{base.ref}: tensor '{name}' is missing")
        if info.shape != shape:
            raise InputError(
                f"{base.ref}: tensor '{name}' has shape {list(info.shape)}, its config.json implies {list(shape)}"
            )
    unused = [name for name in base.tensors if name not in architecture.parameters and name not in architecture.tied]
    if not unused:
        return []
    return [
        f"{base.ref}: {len(unused)} tensor(s) are not parameters of {architecture.class_name} "
        f"(e.g. '{unused[0]}'); they are copied but the loaded model ignores them"
    ]


def _check_ranks(options: UpscaleOptions, linears: list[LinearPlan], num_experts: int) -> list[str]:
    """InputError for a top-k or a given rank out of range; a warning for a router rank that collapses routing."""
    if options.top_k < 1 or options.top_k > num_experts:
        raise InputError(f"--top-k {options.top_k} is out of range: 1 to the number of experts ({num_experts})")
    smallest = min(linears, key=lambda lin: min(lin.out_features, lin.in_features))
    limit = min(smallest.out_features, smallest.in_features)
    if num_experts > 1 and options.router_rank != "auto" and not 1 <= options.router_rank <= limit:
        raise InputError(
            f"--router-rank {options.router_rank} is out of range: 1 to {limit} "
            f"(the smallest dimension of '{smallest.module}')"
        )
    if options.expert_rank not in ("full", "auto") and not 1 <= options.expert_rank_value <= limit:
        raise InputError(
            f"--expert-rank {options.expert_rank} is out of range: 1 to {limit} "
            f"(the smallest dimension of '{smallest.module}'), or 'full'"
        )
    if num_experts > 1 and options.router_rank != "auto":
        collapsed = sorted({module_kind(lin.module) for lin in linears if options.router_rank >= lin.in_features})
        if collapsed:
            return [
                f"--router-rank {options.router_rank} equals the input width of {', '.join(collapsed)}: "
                "every routing logit there is ||x||, so routing collapses; use a smaller router rank"
            ]
    return []


def _output_dtype(options: UpscaleOptions, base: Checkpoint, linears: list[LinearPlan]) -> torch.dtype:
    if options.dtype != "auto":
        return OUTPUT_DTYPES[options.dtype]
    dtype = base.tensors[linears[0].module + ".weight"].dtype
    if dtype not in OUTPUT_DTYPES.values():
        raise InputError(f"{base.ref}: weights are {dtype}; choose an output --dtype (bfloat16, float16, float32)")
    return dtype


def _steps(base: Checkpoint, linears: list[LinearPlan], vocabulary: Vocabulary | None = None) -> list[Step]:
    """Every base tensor in natural order: an upscaled linear at the place of its weight, others copied (the
    vocabulary's embedding and head rows computed when it is not the base's)."""
    rows = vocabulary.size if vocabulary is not None and vocabulary.computed else None
    vocab_tensors = set(vocabulary.tensors) if rows else set()
    by_weight = {lin.module + ".weight": lin for lin in linears}
    biases = {lin.module + ".bias" for lin in linears if lin.has_bias}
    steps = []
    for name in sorted(base.tensors, key=natural_key):
        if name in by_weight:
            steps.append(Step(linear=by_weight[name]))
        elif name not in biases:
            steps.append(Step(copy=name, rows=rows if name in vocab_tensors else None))
    return steps
