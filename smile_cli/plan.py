"""Plan an upscale before doing it: check every input, then name every output tensor, its shape, dtype and shard.

Nothing in this module reads tensor data: the plan comes from the configs and safetensors headers alone, so all
validation happens before the first byte is written. The planning stage around it (planning.load_plan, whose plan
`--dry-run` prints) does read tensors: the non-upscaled ones the experts hold, compared with the base's (kept.py),
and with `auto` ranks every update's singular values (ranks.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from smile_cli import defaults
from smile_cli.architecture import Architecture, read_architecture
from smile_cli.errors import InputError
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.modeling.modeling_smile import module_ranks, smile_linear_shapes
from smile_cli.naming import module_kind, natural_key
from smile_cli.options import AUTO_ROUTING, UpscaleOptions
from smile_cli.targets import describe, select_targets
from smile_cli.vocab import Vocabulary, plan_vocabulary
from smile_cli.writer import OutputTensor, assign_shards

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROUTER_DTYPE = torch.float32
# SmileLinear's parameter names, from its layout (with a bias and a router; factorized, then dense experts): the
# base's weight and bias, and the experts' and routers' (with --calibrate's); the routers' are kept in ROUTER_DTYPE
_LAYOUTS = [
    [name for name, _ in smile_linear_shapes(1, 1, True, 2, 1, rank, calibrated)]
    for rank, calibrated in ((1, False), (0, False), (1, True))
]
SHARED_WEIGHT, SHARED_BIAS, *_, ROUTER_WEIGHT = _LAYOUTS[0]
EXPERT_PARAMETERS = tuple(dict.fromkeys(name for names in _LAYOUTS for name in names[2:]))
# Resident memory of the process before any tensor is read (python, torch, transformers): measured.
PROCESS_BASELINE_BYTES = 450 * 2**20


@dataclass(frozen=True)
class LinearPlan:
    """One nn.Linear of the base to upscale: its module name and shape."""

    module: str
    out_features: int
    in_features: int
    has_bias: bool


@dataclass(frozen=True)
class LinearRanks:
    """The ranks of one upscaled linear: the router rank (0 with one expert) and each expert's rank (0: dense)."""

    router: int
    experts: tuple[int, ...]

    @property
    def factor_rank(self) -> int:
        """The most singular triplets any expert's update needs (for the router and for the expert)."""
        return max(self.router, *self.experts)

    def expert_rows(self, expert: int) -> slice:
        """expert's rows of experts_svh (and columns of experts_u): the experts lie side by side, in order."""
        return slice(sum(self.experts[:expert]), sum(self.experts[: expert + 1]))

    def factor_rank_of(self, expert: int) -> int:
        """How many singular triplets expert's update needs: for the router and for the expert."""
        return max(self.router, self.experts[expert])

    def as_config(self) -> dict:
        return {"router": self.router, "experts": list(self.experts)}

    @classmethod
    def of_config(cls, config: dict, module: str) -> LinearRanks:
        """The ranks of one module of a SMILE config.json (read as a dict), as the modeling code reads them."""
        router, experts = module_ranks(SimpleNamespace(**config), module)
        count = int(config["num_local_experts"])
        experts = (int(experts),) * count if isinstance(experts, int) else tuple(int(k) for k in experts)
        return cls(int(router) if count > 1 else 0, experts)


@dataclass(frozen=True)
class Step:
    """One unit of work: copy a base tensor (`copy` names it) or upscale a linear layer. A copied embedding or
    output head whose rows follow another vocabulary than the base's has `rows` rows (vocab.py computes them)."""

    copy: str | None = None
    linear: LinearPlan | None = None
    rows: int | None = None


@dataclass(frozen=True)
class Plan:
    """Everything an upscale will do, decided before it starts (immutable: a run's statistics are execute's
    result, upscale.RunStats)."""

    options: UpscaleOptions
    base: Checkpoint
    experts: list  # of experts.Expert (experts.py imports this module, not the other way round)
    out_dtype: torch.dtype
    steps: list[Step]
    tensors: list[OutputTensor]
    num_shards: int
    base_params: int
    warnings: list[str] = field(default_factory=list)
    architecture: Architecture | None = None
    ranks: dict[str, LinearRanks] = field(default_factory=dict)  # module -> its ranks
    vocabulary: Vocabulary | None = None
    # non-upscaled tensors an expert changed (kept.py): SMILE keeps the base's
    kept_differences: list[dict] = field(default_factory=list)
    # why `--routing auto` chose options.routing (resolve_routing), e.g. "LlamaForCausalLM is a decoder-only
    # causal LM"; None when the routing was given
    routing_auto: str | None = None
    # a given expert rank was clamped, in some module, to what an expert's update holds (clamp_ranks, or after
    # factorization: with_stored_ranks)
    clamped: bool = False
    # --calibrate: the example prompts (calibrate.CalibrationSet), then the fitted routers (calibrate.Calibrated)
    calibration: object | None = None
    calibrated: object | None = None

    @functools.cached_property
    def _nbytes(self) -> dict[str, int]:
        return {t.name: t.nbytes for t in self.tensors}

    def nbytes_of(self, name: str) -> int:
        return self._nbytes[name]

    def outputs_of(self, step: Step) -> list[str]:
        """Names of the output tensors one step writes, in order."""
        if step.copy:
            return [step.copy]
        ranks, calibrated = self.ranks[step.linear.module], self.calibration is not None
        return [name for name, _, _ in linear_outputs(step.linear, ranks, ROUTER_DTYPE, calibrated)]

    @property
    def linears(self) -> list[LinearPlan]:
        return [s.linear for s in self.steps if s.linear is not None]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def budgeted(self) -> bool:
        """Whether ranks were allocated per module (`auto`) rather than given."""
        return "auto" in (self.options.router_rank, self.options.expert_rank)

    @property
    def per_module_ranks(self) -> bool:
        """Whether modules have ranks of their own (allocated, or clamped) rather than the options' uniform ones."""
        return self.budgeted or self.clamped

    def ranks_by_kind(self) -> dict | None:
        """Allocated or clamped ranks, for people to read (None when given): see mean_ranks_by_kind."""
        return mean_ranks_by_kind(self.ranks) if self.per_module_ranks else None

    def with_ranks(self, ranks: dict[str, LinearRanks]) -> Plan:
        """The same plan with every module at `ranks` (allocated ones): its output tensors and shards follow."""
        _check_allocated_ranks(ranks, self.linears, self.num_experts)
        entries = _output_tensors(self.base, self.steps, ranks, self.out_dtype, self.calibration is not None)
        tensors = assign_shards(entries, self.options.max_shard_size)
        return dataclasses.replace(self, ranks=ranks, tensors=tensors, num_shards=tensors[-1].shard + 1)

    @property
    def clamps_at_factorization(self) -> bool:
        """Whether a dense update's factors are stored at its numerical rank where that is below the given rank
        (experts.kept_rank): with given ranks and factorized experts; allocated ranks follow the spectra already."""
        return not (self.budgeted or self.options.dense_experts)

    def with_stored_ranks(self, stored: dict[str, tuple[int, ...]]) -> Plan:
        """The plan as written when some modules' expert factors came out below the planned ranks (`stored`, from
        the shards: writer.stored_ranks): those modules at their stored ranks, every tensor in the shard it was
        planned in (the layout is fixed before the factors exist: writer.py). The plan itself when none did."""
        if not stored:
            return self
        ranks = {m: LinearRanks(r.router, stored.get(m, r.experts)) for m, r in self.ranks.items()}
        _check_allocated_ranks(ranks, self.linears, self.num_experts)
        entries = _output_tensors(self.base, self.steps, ranks, self.out_dtype)
        tensors = [OutputTensor(n, tuple(s), d, t.shard) for (n, s, d), t in zip(entries, self.tensors, strict=True)]
        return dataclasses.replace(self, ranks=ranks, tensors=tensors, clamped=True)

    def ranks_table(self) -> dict | None:
        """config.json's smile_ranks: every module's ranks when they were allocated or clamped, else None."""
        return {m: r.as_config() for m, r in self.ranks.items()} if self.per_module_ranks else None

    @property
    def out_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def peak_memory_estimate(self) -> int:
        """Bytes of resident memory the run needs: a constant plus the largest layer's working set.

        For one linear (out x in): the base weight as read and in float32, one expert weight as read and
        its float32 task update, the SVD's copy and thin U (all float32), the kept factors of every expert.
        """
        largest = 0
        for lin in self.linears:
            n = lin.out_features * lin.in_features
            read = self.base.tensors[lin.module + ".weight"].dtype.itemsize
            thin = min(lin.out_features, lin.in_features) * max(lin.out_features, lin.in_features)
            factors = self.num_experts * self.ranks[lin.module].factor_rank * (lin.out_features + lin.in_features) * 4
            largest = max(largest, n * (2 * read + 3 * 4) + thin * 4 + factors)
        biggest_copy = max((self.base.tensors[s.copy].nbytes for s in self.steps if s.copy), default=0)
        return PROCESS_BASELINE_BYTES + max(largest, 2 * biggest_copy)

    @property
    def upscaled_kinds(self) -> list[str]:
        return sorted({module_kind(lin.module) for lin in self.linears})

    @property
    def targeted_modules(self) -> list[str]:
        """The upscaled modules, grouped over layers (model.layers.*.mlp.up_proj), for people to read."""
        return describe(self.target_modules, self.architecture)

    @property
    def target_modules(self) -> list[str]:
        """Full names of the upscaled modules, in the architecture's module order (config.json records them)."""
        upscaled = {lin.module for lin in self.linears}
        return [name for name in self.architecture.linears if name in upscaled]

    def summary(self) -> dict:
        return {
            "base": self.base.ref,
            "experts": [e.ref for e in self.experts],
            "architecture": self.architecture.class_name,
            "upscaled_linears": len(self.linears),
            "upscaled_kinds": self.upscaled_kinds,
            "targeted_modules": self.targeted_modules,
            "copied_tensors": sum(1 for s in self.steps if s.copy),
            "output_tensors": len(self.tensors),
            "output_bytes": self.out_bytes,
            "shards": self.num_shards,
            "dtype": str(self.out_dtype).removeprefix("torch."),
            "base_params": self.base_params,
            "params": self.out_params,
            "params_ratio": round(self.out_params / self.base_params, 4) if self.base_params else None,
            "peak_memory_estimate_bytes": self.peak_memory_estimate(),
            "routing": self.options.routing,
            "routing_auto": self.routing_auto,
            "ranks_by_kind": self.ranks_by_kind(),
            "ranks_clamped": self.clamped,
            "vocabulary": self.vocabulary.summary() if self.vocabulary else None,
            "kept_differences": list(self.kept_differences),
            "warnings": list(self.warnings),
            **({"calibration": self._calibration_summary()} if self.calibration is not None else {}),
        }

    def _calibration_summary(self) -> dict:
        """--calibrate: the fit's report (calibrate.summarise) once fitted; before (a dry run), the prompts."""
        if self.calibrated is not None:
            return self.calibrated.report
        return {
            "file": self.calibration.path,
            "prompts_per_expert": [len(p) for p in self.calibration.prompts],
            "fitted": False,
        }


def mean_ranks_by_kind(ranks: dict[str, LinearRanks]) -> dict:
    """Per kind of module (mlp.up_proj, ...): the mean router rank and each expert's mean rank over layers."""
    kinds: dict[str, list[LinearRanks]] = {}
    for module, r in ranks.items():
        kinds.setdefault(module_kind(module), []).append(r)
    return {
        kind: {
            "router": round(sum(r.router for r in rs) / len(rs), 2),
            "experts": [round(sum(r.experts[i] for r in rs) / len(rs), 2) for i in range(len(rs[0].experts))],
        }
        for kind, rs in sorted(kinds.items())
    }


def format_mean_ranks(entry: dict) -> str:
    """One entry of mean_ranks_by_kind, for people: 'router 8, experts 12.5, 9, 20'."""
    return f"router {entry['router']:g}, experts {', '.join(f'{k:g}' for k in entry['experts'])}"


def build_plan(options: UpscaleOptions, base: Checkpoint, experts: list) -> Plan:
    """The plan, every module at the options' ranks (`auto` ranks at 1, until Plan.with_ranks gives the ranks that
    ranks.allocate_ranks chose)."""
    warnings: list[str] = [w for c in [base, *experts] for w in c.warnings]
    architecture = read_architecture(base.ref, base.config, base.tensors.keys())
    options, routing_auto = resolve_routing(options, architecture)
    _check_expert_list(options, base, experts, warnings)
    _check_base_complete(base, architecture, warnings)
    linears = _find_linears(base, architecture, options.target)
    for expert in experts:
        expert.check_against(base, linears, warnings)
    _check_ranks(options, linears, len(experts), warnings)
    vocabulary = plan_vocabulary(options, base, experts, architecture, warnings)
    ranks = {lin.module: uniform_ranks(options, len(experts)) for lin in linears}
    out_dtype = _output_dtype(options, base, linears)
    steps = _steps(base, linears, vocabulary)
    tensors = assign_shards(_output_tensors(base, steps, ranks, out_dtype), options.max_shard_size)
    base_params = sum(math.prod(info.shape) for info in base.tensors.values())
    num_shards = tensors[-1].shard + 1 if tensors else 0
    return Plan(
        options,
        base,
        experts,
        out_dtype,
        steps,
        tensors,
        num_shards,
        base_params,
        warnings,
        architecture,
        ranks,
        vocabulary,
        routing_auto=routing_auto,
    )


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


def clamp_ranks(plan: Plan) -> Plan:
    """The plan with each expert's given rank clamped to the rank its update holds, where that is known without
    reading a weight (a LoRA adapter's r, per module; Expert.update_rank): rows beyond it would be all zeros, and
    the model computes the same function without them. No clamp applies (the plan unchanged, byte-identical
    output) with budgeted or dense experts, or where every update holds the given rank (full fine-tunes). A
    fine-tuned checkpoint's update rank is known only from its spectrum: it is clamped as it is factorized
    (experts.kept_rank, Plan.with_stored_ranks), not here."""
    if plan.budgeted or plan.options.dense_experts:
        return plan
    ranks, clamped = {}, False
    for lin in plan.linears:
        given = plan.ranks[lin.module]
        experts = []
        for k, expert in zip(given.experts, plan.experts, strict=True):
            held = expert.update_rank(lin)
            experts.append(k if held is None else max(1, min(k, held)))  # one row even for a zero update
        clamped |= tuple(experts) != given.experts
        ranks[lin.module] = LinearRanks(given.router, tuple(experts))
    return dataclasses.replace(plan.with_ranks(ranks), clamped=True) if clamped else plan


def uniform_ranks(options: UpscaleOptions, num_experts: int) -> LinearRanks:
    """The ranks options give every module (`auto`: 1, a placeholder until ranks are allocated)."""
    router = 0 if num_experts == 1 else (1 if options.router_rank == "auto" else options.router_rank)
    expert = 1 if options.expert_rank == "auto" else options.expert_rank_value
    return LinearRanks(router, (expert,) * num_experts)


def _check_allocated_ranks(ranks: dict[str, LinearRanks], linears: list[LinearPlan], num_experts: int) -> None:
    for lin in linears:
        r = ranks.get(lin.module)
        limit = min(lin.out_features, lin.in_features)
        if r is None or len(r.experts) != num_experts:
            raise InputError(f"no ranks for '{lin.module}' ({num_experts} experts)")
        dense = all(k == 0 for k in r.experts)
        if (num_experts > 1 and not 1 <= r.router <= limit) or not (dense or all(1 <= k <= limit for k in r.experts)):
            raise InputError(f"ranks {r.as_config()} of '{lin.module}' are out of range: 1 to {limit}")


def _check_expert_list(options, base, experts, warnings):
    if not experts:
        raise InputError("no experts given (--experts REF,REF,...)")
    seen: dict = {}
    for expert in experts:
        if expert.path == base.path:
            warnings.append(f"{expert.ref}: is the base model itself; its updates are all zero")
        if expert.path in seen:
            warnings.append(f"{expert.ref}: given twice (same as {seen[expert.path]})")
        seen[expert.path] = expert.ref


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


def _check_base_complete(base: Checkpoint, architecture: Architecture, warnings: list[str]) -> None:
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
    if unused:
        warnings.append(
            f"{base.ref}: {len(unused)} tensor(s) are not parameters of {architecture.class_name} "
            f"(e.g. '{unused[0]}'); they are copied but the loaded model ignores them"
        )


def _check_ranks(options: UpscaleOptions, linears: list[LinearPlan], num_experts: int, warnings: list[str]) -> None:
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
            warnings.append(
                f"--router-rank {options.router_rank} equals the input width of {', '.join(collapsed)}: "
                "every routing logit there is ||x||, so routing collapses; use a smaller router rank"
            )


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


def linear_outputs(lin: LinearPlan, ranks: LinearRanks, dtype: torch.dtype, calibrated: bool = False):
    """(name, shape, dtype) of the tensors one upscaled linear writes, in file order: SmileLinear's parameters as
    modeling_smile.smile_linear_shapes lays them out (the routers in ROUTER_DTYPE, the rest in dtype); calibrated:
    with the routers of --calibrate."""
    shapes = smile_linear_shapes(
        lin.in_features, lin.out_features, lin.has_bias, len(ranks.experts), ranks.router, list(ranks.experts),
        calibrated,
    )  # fmt: skip
    for name, shape in shapes:
        yield f"{lin.module}.{name}", shape, ROUTER_DTYPE if is_router_tensor(name) else dtype


def is_router_tensor(name: str) -> bool:
    """Whether a SmileLinear parameter (its name within the module) is a router's, kept in ROUTER_DTYPE."""
    return name == ROUTER_WEIGHT or name.startswith("router.")


def _output_tensors(
    base: Checkpoint, steps: list[Step], ranks: dict[str, LinearRanks], out_dtype: torch.dtype, calibrated=False
):
    for step in steps:
        if step.copy:
            info = base.tensors[step.copy]
            shape = (step.rows, *info.shape[1:]) if step.rows is not None else info.shape
            yield step.copy, shape, out_dtype if info.dtype.is_floating_point else info.dtype
        else:
            yield from linear_outputs(step.linear, ranks[step.linear.module], out_dtype, calibrated)
