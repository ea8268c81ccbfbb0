"""What an upscale will do, as types: the plan every stage reads (LinearPlan, LinearRanks, Step, Survey, Plan) and
the output's layout (every tensor's name, shape, dtype and shard, from SmileLinear's own layout).

Nothing here reads tensor data or decides anything: planning.py checks the inputs and makes the plan (it reads the
tensors that decide it: the kept tensors, kept.py, and with `auto` ranks every update's singular values, ranks.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from smile_cli.architecture import Architecture
from smile_cli.errors import InputError
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.modeling.modeling_smile import module_ranks, smile_linear_shapes
from smile_cli.naming import module_kind
from smile_cli.options import UpscaleOptions
from smile_cli.targets import describe
from smile_cli.vocab import Vocabulary
from smile_cli.writer import OutputTensor

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


@dataclass(frozen=True, kw_only=True)
class Survey:
    """The checked inputs and what the output holds apart from its ranks: every step (copied tensors and upscaled
    linears), the output dtype, the vocabulary, the routing. What ranks are decided from (ranks.allocate_ranks,
    planning.decide_ranks) and what the plan adds them to."""

    options: UpscaleOptions  # with `--routing auto` resolved (planning.resolve_routing)
    base: Checkpoint
    experts: list  # of inputs.experts.Expert (it imports this module, not the other way round)
    architecture: Architecture
    out_dtype: torch.dtype
    steps: list[Step]
    base_params: int
    vocabulary: Vocabulary | None = None
    warnings: list[str] = field(default_factory=list)
    # why `--routing auto` chose options.routing (planning.resolve_routing), e.g. "LlamaForCausalLM is a
    # decoder-only causal LM"; None when the routing was given
    routing_auto: str | None = None

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


@dataclass(frozen=True, kw_only=True)
class Plan(Survey):
    """Everything an upscale will do, decided before it starts: the survey with every module's ranks and the
    output's layout (immutable: a run's statistics are execute's result, upscale.RunStats)."""

    ranks: dict[str, LinearRanks]  # module -> its ranks
    tensors: list[OutputTensor]
    num_shards: int
    # a given expert rank was clamped, in some module, to what an expert's update holds (planning.decide_ranks, or
    # after factorization: with_stored_ranks)
    clamped: bool = False
    # non-upscaled tensors an expert changed (kept.py): SMILE keeps the base's
    kept_differences: list[dict] = field(default_factory=list)
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
    def per_module_ranks(self) -> bool:
        """Whether modules have ranks of their own (allocated, or clamped) rather than the options' uniform ones."""
        return self.budgeted or self.clamped

    def ranks_by_kind(self) -> dict | None:
        """Allocated or clamped ranks, for people to read (None when given): see mean_ranks_by_kind."""
        return mean_ranks_by_kind(self.ranks) if self.per_module_ranks else None

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
        check_ranks(ranks, self.linears, self.num_experts)
        entries = output_tensors(self.base, self.steps, ranks, self.out_dtype, self.calibration is not None)
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


def check_ranks(ranks: dict[str, LinearRanks], linears: list[LinearPlan], num_experts: int) -> None:
    """InputError unless every linear has ranks for every expert within 1 .. min(out, in) (0 for dense experts)."""
    for lin in linears:
        r = ranks.get(lin.module)
        limit = min(lin.out_features, lin.in_features)
        if r is None or len(r.experts) != num_experts:
            raise InputError(f"no ranks for '{lin.module}' ({num_experts} experts)")
        dense = all(k == 0 for k in r.experts)
        if (num_experts > 1 and not 1 <= r.router <= limit) or not (dense or all(1 <= k <= limit for k in r.experts)):
            raise InputError(f"ranks {r.as_config()} of '{lin.module}' are out of range: 1 to {limit}")


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


def output_tensors(
    base: Checkpoint, steps: list[Step], ranks: dict[str, LinearRanks], out_dtype: torch.dtype, calibrated=False
):
    """(name, shape, dtype) of every output tensor, in file order: each step's (linear_outputs for an upscaled
    linear; a copied tensor in out_dtype, or its own dtype when it is not floating-point)."""
    for step in steps:
        if step.copy:
            info = base.tensors[step.copy]
            shape = (step.rows, *info.shape[1:]) if step.rows is not None else info.shape
            yield step.copy, shape, out_dtype if info.dtype.is_floating_point else info.dtype
        else:
            yield from linear_outputs(step.linear, ranks[step.linear.module], out_dtype, calibrated)
