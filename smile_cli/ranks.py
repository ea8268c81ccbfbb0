"""Budgeted ranks (`--expert-rank auto --budget 1.2x`, `--router-rank auto`): ranks per module and expert, chosen
from the singular values of the task updates.

One extra pass before the upscale streams every update as upscale does (the base weight and one expert's update
in memory) and keeps its top `cap` singular values and its energy ||dW||_F^2. Then:

- router rank of a module (`auto`): the median over its experts of the smallest rank holding ROUTER_ENERGY of
  the update's energy, within 1 .. in / ROUTER_WIDTH_DIVISOR (far from the input width, where routing logits
  all approach ||x|| and routing collapses). One router rank per module: the experts' logits must be comparable.
- expert ranks: every (module, expert) keeps at least rank 1; each further singular direction j of update i of
  module m costs out + in parameters and gains its share of that update's energy, s_j^2 / ||dW_i||_F^2. Taking
  directions by gain per parameter, best first, until the budget is spent maximises the summed kept energy
  shares (the gains of one update decrease with j, so this greedy choice is optimal). Relative shares make every
  module and expert count alike whatever the scale of its update. No update gets more than `cap` components:
  twice the uniform rank the same budget allows (the spectra are computed up to there).
The budget counts every parameter of the output: the base's (copied tensors included), routers, expert factors
and expert biases.
"""

from __future__ import annotations

import logging
import math
import statistics

import torch

from smile_cli.compute import UpdateFactorizer
from smile_cli.errors import InputError
from smile_cli.inputs.checks import read_finite
from smile_cli.inputs.experts import BaseLayer, Wanted
from smile_cli.options import BUDGET
from smile_cli.plan import ROUTER_DTYPE, LinearPlan, LinearRanks, Survey, linear_outputs

ROUTER_ENERGY = 0.5
ROUTER_WIDTH_DIVISOR = 16
CAP_FACTOR = 2
log = logging.getLogger("smile")


def parse_budget(budget: str, base_params: int) -> int:
    """'1.2x' (times the base's parameters) or a count such as 8e9, 7.5B, 300M."""
    match = BUDGET.fullmatch(budget.strip().lower())
    if not match:
        raise InputError(f"--budget {budget!r}: give a ratio like 1.2x or a parameter count like 7.5B")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "x":
        return int(value * base_params)
    return int(value * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[unit])


def linear_params(lin: LinearPlan, ranks: LinearRanks) -> int:
    """Parameters of one upscaled linear (expert ranks 0: dense experts): those of its output tensors."""
    return sum(math.prod(shape) for _, shape, _ in linear_outputs(lin, ranks, ROUTER_DTYPE))


def model_params(plan: Survey, ranks: dict[str, LinearRanks]) -> int:
    """Parameters of the SMILE model: the base's, with each upscaled linear replaced."""
    base = sum(lin.out_features * lin.in_features + (lin.out_features if lin.has_bias else 0) for lin in plan.linears)
    return plan.base_params - base + sum(linear_params(lin, ranks[lin.module]) for lin in plan.linears)


def uniform_rank_for_budget(plan: Survey, routers: dict[str, int], budget: int) -> int | None:
    """The largest expert rank k (1 .. the smallest min(out, in)), the same everywhere, whose model fits budget."""
    t = plan.num_experts
    limit = min(min(lin.out_features, lin.in_features) for lin in plan.linears)
    fixed = model_params(plan, {m: LinearRanks(g, (1,) * t) for m, g in routers.items()})
    slope = sum(t * (lin.out_features + lin.in_features) for lin in plan.linears)
    k = min(limit, 1 + (budget - fixed) // slope) if budget >= fixed else 0
    return int(k) if k >= 1 else None


def update_spectra(plan: Survey, lin: LinearPlan, factorizer: UpdateFactorizer, rank: int):
    """Yield (expert index, top-`rank` factors, ||dW||_F^2, whether the whole spectrum was computed) for every
    expert's update of lin, one update in memory at a time (inputs/experts.py)."""
    base = BaseLayer.reading(plan.base, lin, read_finite, factorizer)
    for index, expert in enumerate(plan.experts):
        update = expert.update(base, Wanted(rank, energy=True))
        yield index, update.factors, update.energy, update.complete


def allocate_ranks(plan: Survey) -> dict[str, LinearRanks]:
    """Every module's ranks for the plan's `auto` options (see the module docstring)."""
    options, t = plan.options, plan.num_experts
    fixed_router = options.router_rank if options.router_rank != "auto" else None
    if fixed_router is None and t == 1:
        fixed_router = 0
    budget = parse_budget(options.budget, plan.base_params) if options.expert_rank == "auto" else None
    cap = 0  # the spectra needed: up to the cap of the expert ranks, and enough for the router's energy rule
    if budget is not None:
        least_routers = {lin.module: fixed_router or 1 for lin in plan.linears}
        guess = uniform_rank_for_budget(plan, least_routers, budget)
        if guess is None:
            _too_small(plan, budget, least_routers)
        cap = CAP_FACTOR * guess
    factorizer = UpdateFactorizer(options.svd, options.seed, options.device)
    log.info("allocating ranks: singular values of %d updates", len(plan.linears) * t)
    spectra: dict[str, list[tuple[torch.Tensor, float]]] = {}
    for lin in plan.linears:
        router_cap = max(1, lin.in_features // ROUTER_WIDTH_DIVISOR) if fixed_router is None else 0
        wanted = min(lin.out_features, lin.in_features, max(cap, router_cap))
        updates = update_spectra(plan, lin, factorizer, wanted)
        spectra[lin.module] = [(factors.s[:wanted].double(), total) for _, factors, total, _ in updates]
    routers = {
        lin.module: fixed_router
        if fixed_router is not None
        else min(router_rank_for(spectra[lin.module], lin.in_features), lin.out_features)
        for lin in plan.linears
    }
    if budget is None:
        return {m: LinearRanks(g, (options.expert_rank_value,) * t) for m, g in routers.items()}
    return allocate_expert_ranks(plan, routers, spectra, budget, cap)


def rank_for_energy(s: torch.Tensor, total: float, level: float) -> int | None:
    """Smallest n whose top-n components (singular values s of an update of energy `total`) hold `level` of the
    energy; None for a zero update, or if the computed ones do not (the one energy-rank rule: routers, inspect)."""
    if total <= 0:
        return None
    reached = (s.double().square().cumsum(0) >= level * total * (1 - 1e-9)).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


def router_rank_for(spectra: list[tuple[torch.Tensor, float]], in_features: int) -> int:
    """The median over experts of the smallest rank holding ROUTER_ENERGY of the update's energy, clamped."""
    limit = max(1, in_features // ROUTER_WIDTH_DIVISOR)
    ranks = []
    for s, total in spectra:
        if total > 0:
            rank = rank_for_energy(s, total, ROUTER_ENERGY)
            ranks.append(limit if rank is None else rank)
    return min(limit, max(1, round(statistics.median(ranks)))) if ranks else 1


def allocate_expert_ranks(plan: Survey, routers: dict[str, int], spectra, budget: int, cap: int):
    """Expert ranks per module and expert under the budget: greedy by energy share per parameter."""
    t = plan.num_experts
    ranks = {m: [1] * t for m in routers}
    left = budget - model_params(plan, {m: LinearRanks(g, (1,) * t) for m, g in routers.items()})
    if left < 0:
        _too_small(plan, budget, routers)
    gains, costs, owners = [], [], []
    for lin in plan.linears:
        cost = lin.out_features + lin.in_features
        for i, (s, total) in enumerate(spectra[lin.module]):
            extra = s[1:cap]  # rank 1 is everyone's; components 2 .. cap are for sale
            share = extra.square() / total if total > 0 else torch.zeros_like(extra)
            gains.append(share / cost)
            costs.append(torch.full_like(extra, cost))
            owners += [(lin.module, i)] * len(extra)
    if owners:
        gain, cost = torch.cat(gains), torch.cat(costs)
        for position in torch.argsort(gain, descending=True, stable=True).tolist():
            if gain[position] <= 0:
                break
            if cost[position] <= left:  # the components of one update cost alike: they are bought in order
                left -= int(cost[position])
                module, i = owners[position]
                ranks[module][i] += 1
    return {m: LinearRanks(routers[m], tuple(r)) for m, r in ranks.items()}


def _too_small(plan: Survey, budget: int, routers: dict[str, int]):
    t = plan.num_experts
    least = model_params(plan, {m: LinearRanks(g, (1,) * t) for m, g in routers.items()})
    raise InputError(
        f"--budget {plan.options.budget} ({budget:,} parameters) is below the smallest SMILE model of these inputs: "
        f"{least:,} parameters ({least / plan.base_params:.3f}x the base) with rank 1 everywhere"
    )
