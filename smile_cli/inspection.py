"""`smile inspect`: what a SMILE model of these inputs would keep, without writing one.

Streams like upscale (one linear at a time: its base weight and one expert's task update in memory) and
factorizes each update with the needed rank only. Per upscaled linear and expert:
- energy kept at rank k: sum of the top-k s^2 over ||dW||_F^2 (the total comes from the update itself);
- rank_90: the number of components holding 90% of the energy (None when more than the computed ones);
- effective_rank: exp(entropy of s^2 / sum s^2), when the whole spectrum was computed (else None);
- overlap of experts i, j: ||V_i^T V_j||_F^2 / g over their router-rank (g) right singular subspaces,
  0 for orthogonal subspaces, 1 for equal ones: the interference routing must resolve.
Also the parameter counts at the chosen ranks, the routing-collapse warning, and for a budget: the largest uniform
expert rank whose parameter count fits it, and the ranks `--expert-rank auto` would allocate under it (ranks.py).
The report's tables: render.py.
"""

from __future__ import annotations

import logging

import torch

from smile_cli import defaults
from smile_cli.compute import UpdateFactorizer
from smile_cli.errors import InputError
from smile_cli.naming import layer_index, module_kind
from smile_cli.options import UpscaleOptions
from smile_cli.plan import LinearPlan, LinearRanks, Plan, mean_ranks_by_kind
from smile_cli.planning import load_plan
from smile_cli.ranks import (
    CAP_FACTOR,
    allocate_expert_ranks,
    model_params,
    parse_budget,
    rank_for_energy,
    uniform_rank_for_budget,
    update_spectra,
)

ENERGY_LEVEL = 0.9
# routing is close to collapse when the router rank reaches this fraction of the input width
COLLAPSE_FRACTION = 0.5
log = logging.getLogger("smile")


# ------------------------------------------------------------------------------------ spectrum math


def energy_kept(s: torch.Tensor, total: float, k: int) -> float | None:
    """Fraction of ||dW||_F^2 held by the top-k singular values (None for a zero update)."""
    if total <= 0:
        return None
    return min(1.0, float(s[:k].double().square().sum()) / total)


def effective_rank(s: torch.Tensor) -> float | None:
    """exp(entropy) of the normalised squared singular values (Roy & Vetterli)."""
    p = s.double().square()
    if p.sum() <= 0:
        return None
    p = p[p > 0] / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_overlap(v_i: torch.Tensor, v_j: torch.Tensor) -> float:
    """||V_i V_j^T||_F^2 / g for two (g x in) sets of orthonormal rows."""
    return float((v_i.double() @ v_j.double().T).square().sum()) / v_i.shape[0]


# ------------------------------------------------------------------------------------ parameters


def uniform(plan: Plan, router_rank: int, expert_rank: int) -> dict[str, LinearRanks]:
    return {lin.module: LinearRanks(router_rank, (expert_rank,) * plan.num_experts) for lin in plan.linears}


def rank_for_budget(plan: Plan, router_rank: int, budget: int) -> int | None:
    """The largest uniform expert rank k (1 .. the smallest min(out, in)) whose model fits `budget`."""
    return uniform_rank_for_budget(plan, {lin.module: router_rank for lin in plan.linears}, budget)


# ------------------------------------------------------------------------------------ the report


def inspect(
    options: UpscaleOptions,
    *,
    budget: str | None = None,
    spectrum_rank: int = defaults.SPECTRUM_RANK,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """The report (a JSON-ready dict): see the module docstring and docs/lora-export-inspect.md."""
    if "auto" in (options.router_rank, options.expert_rank):
        raise InputError(
            "inspect reports at given ranks: set --router-rank N and --expert-rank N|full (its --budget shows "
            "the ranks `--expert-rank auto` would allocate)"
        )
    plan = load_plan(options, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    t, g, k = plan.num_experts, options.router_rank, options.expert_rank_value
    router_rank = g if t > 1 else 0
    budget_report = None
    k_budget = None
    if budget is not None:
        allowed = parse_budget(budget, plan.base_params)
        k_budget = rank_for_budget(plan, router_rank, allowed)
        budget_report = {
            "budget": budget,
            "params": allowed,
            "expert_rank": k_budget,
            "model_params": model_params(plan, uniform(plan, router_rank, k_budget)) if k_budget else None,
            "dense_experts_fit": model_params(plan, uniform(plan, router_rank, 0)) <= allowed,
        }
    factorizer = UpdateFactorizer(options.svd, options.seed, options.device)
    layers, spectra = [], {}
    for lin in plan.linears:
        layer, spectra[lin.module] = _inspect_linear(plan, lin, factorizer, router_rank, k, k_budget, spectrum_rank)
        layers.append(layer)
    if k_budget:  # what `--expert-rank auto --budget` would allocate (ranks.py), from the same spectra
        allocated = allocate_expert_ranks(
            plan, {lin.module: router_rank for lin in plan.linears}, spectra, allowed, CAP_FACTOR * k_budget
        )
        for layer in layers:
            for record, rank in zip(layer["experts"], allocated[layer["module"]].experts, strict=True):
                record["rank_allocated"] = rank
                record["energy_allocated"] = energy_kept(
                    spectra[layer["module"]][record["index"]][0], record["energy_total"], rank
                )
        budget_report["allocated"] = {
            "model_params": model_params(plan, allocated),
            "ranks_by_kind": mean_ranks_by_kind(allocated),
        }
    collapse = _collapse_warnings(plan, router_rank)
    for warning in collapse:  # load_plan logged the plan's own warnings
        log.warning(warning)
    warnings = list(plan.warnings) + collapse
    return {
        "base": plan.base.ref,
        "experts": [e.ref for e in plan.experts],
        "router_rank": router_rank,
        "expert_rank": options.expert_rank,
        "spectrum_rank": spectrum_rank,
        "energy_level": ENERGY_LEVEL,
        "layers": layers,
        "kinds": _by_kind(layers, t),
        "params": {
            "base": plan.base_params,
            "smile": model_params(plan, plan.ranks),
            "ratio": round(model_params(plan, plan.ranks) / plan.base_params, 4),
            "upscaled_linears": len(plan.linears),
        },
        "budget": budget_report,
        "factorization": factorizer.report(),
        "warnings": warnings,
    }


def _inspect_linear(plan: Plan, lin: LinearPlan, factorizer, router_rank: int, k: int, k_budget, spectrum_rank: int):
    """(the layer's report, [(singular values, energy) per expert])."""
    m, shape = lin.module, (lin.out_features, lin.in_features)
    full = min(shape)
    wanted = min(full, max(router_rank, k, CAP_FACTOR * (k_budget or 0), spectrum_rank))
    experts, routers, spectra = [], [], []
    for index, factors, total, complete in update_spectra(plan, lin, factorizer, wanted):
        s = factors.s[:wanted]
        spectra.append((s.double(), total))
        record = {
            "index": index,
            "energy_total": total,
            "zero": total == 0.0,
            "energy_router": energy_kept(s, total, router_rank) if router_rank else None,
            "energy_expert": energy_kept(s, total, k) if k > 0 else (1.0 if total > 0 else None),
            "energy_budget": energy_kept(s, total, k_budget) if k_budget else None,
            "rank_90": rank_for_energy(s, total, ENERGY_LEVEL),
            "effective_rank": effective_rank(factors.s) if complete else None,
            "singular_values": [float(f"{v:.6g}") for v in s.tolist()],
        }
        experts.append(record)
        routers.append(None if total == 0.0 else factors.vh[:router_rank])
    overlap = None
    if router_rank:
        overlap = [[_overlap(routers[i], routers[j]) for j in range(len(routers))] for i in range(len(routers))]
    return {
        "module": m,
        "kind": module_kind(m),
        "shape": list(shape),
        "router_fraction": round(router_rank / lin.in_features, 4) if router_rank else None,
        "experts": experts,
        "overlap": overlap,
    }, spectra


def _overlap(v_i, v_j) -> float | None:
    if v_i is None or v_j is None:
        return None
    return round(subspace_overlap(v_i, v_j), 6)


def _collapse_warnings(plan: Plan, router_rank: int) -> list[str]:
    """Routing collapses when the router rank equals the input width (planning.py warns); warn when it is close."""
    if not router_rank:
        return []
    near = sorted(
        {
            f"{module_kind(lin.module)} ({router_rank}/{lin.in_features})"
            for lin in plan.linears
            if COLLAPSE_FRACTION * lin.in_features <= router_rank < lin.in_features
        }
    )
    if not near:
        return []
    return [
        f"--router-rank {router_rank} is close to the input width of {', '.join(near)}: routing logits approach "
        "||x|| there and routing nears collapse; use a smaller router rank"
    ]


def _mean(values):
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def _by_kind(layers: list[dict], num_experts: int) -> list[dict]:
    """Per module kind (mlp.up_proj, ...): per expert the mean energies over layers, the mean pair overlap."""
    kinds: dict[str, list[dict]] = {}
    for layer in layers:
        kinds.setdefault(layer["kind"], []).append(layer)
    summary = []
    for kind, group in sorted(kinds.items()):
        row = {"kind": kind, "layers": len(group), "experts": []}
        for i in range(num_experts):
            records = [layer["experts"][i] for layer in group]
            row["experts"].append(
                {
                    "index": i,
                    "energy_router": _mean(r["energy_router"] for r in records),
                    "energy_expert": _mean(r["energy_expert"] for r in records),
                    "energy_budget": _mean(r["energy_budget"] for r in records),
                    "rank_90": _mean(r["rank_90"] for r in records),
                }
            )
        pairs = [
            layer["overlap"][i][j]
            for layer in group
            if layer["overlap"]
            for i in range(num_experts)
            for j in range(i + 1, num_experts)
        ]
        row["overlap_mean"] = _mean(pairs)
        row["overlap_max"] = max((p for p in pairs if p is not None), default=None)
        summary.append(row)
    return summary


# ------------------------------------------------------------------------------------ figures


def write_plots(report: dict, folder) -> list[str]:
    """PNG figures of the report in folder: energy kept per layer, mean overlaps, mean spectra per kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'smile-cli[plot]' (or pip install matplotlib)") from e
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, experts = report["layers"], report["experts"]
    kinds = sorted({layer["kind"] for layer in layers})
    depth = sorted({(layer_index(layer["module"]) or 0) for layer in layers})
    written = []

    fig, axes = plt.subplots(1, len(experts), figsize=(3 + 3 * len(experts), 4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        grid = torch.full((len(depth), len(kinds)), float("nan"))
        for layer in layers:
            value = layer["experts"][i]["energy_expert"]
            if value is not None:
                grid[depth.index(layer_index(layer["module"]) or 0), kinds.index(layer["kind"])] = value
        image = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"expert {i}", fontsize=9)
        ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=7)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"energy kept at expert rank {report['expert_rank']}")
    written.append(_save(fig, folder / "energy.png", plt))

    if report["router_rank"]:
        t = len(experts)
        mean = torch.zeros(t, t)
        for i in range(t):
            for j in range(t):
                mean[i, j] = _mean(layer["overlap"][i][j] for layer in layers) or 0.0
        fig, ax = plt.subplots(figsize=(4, 3.5))
        image = ax.imshow(mean.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_title(f"mean router-subspace overlap (g={report['router_rank']})", fontsize=9)
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
        fig.colorbar(image, ax=ax)
        written.append(_save(fig, folder / "overlap.png", plt))

    fig, axes = plt.subplots(1, len(kinds), figsize=(3 * len(kinds), 3), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for i in range(len(experts)):
            curves = []
            for layer in layers:
                record = layer["experts"][i]
                if layer["kind"] == kind and record["energy_total"] > 0:
                    s = torch.tensor(record["singular_values"], dtype=torch.float64)
                    curves.append(s.square().cumsum(0) / record["energy_total"])
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), torch.stack([c[:n] for c in curves]).mean(0).numpy(), label=f"expert {i}")
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("rank")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("energy kept")
    axes[0][0].legend(fontsize=7)
    written.append(_save(fig, folder / "spectrum.png", plt))
    return written


def _save(fig, path, plt) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)
