"""Why routing works or not: how low-rank the task updates are, and how much the experts' routers overlap.

update_diagnostics(base_sd, expert_sds, ranks, router_rank) -> {
    "energy": {rank: mean share of ||dW||_F^2 in the top-`rank` singular values}   (per expert, averaged
              over every upscaled projection),
    "overlap": mean over projections and expert pairs of ||V_i^T V_j||_F^2 / router_rank, the squared cosine
               between two experts' router subspaces (top right singular vectors): 0 = orthogonal routers,
               1 = identical (routing cannot tell the tasks apart),
    "overlap_by_proj": the same per projection type (q_proj, ..., down_proj)}
"""

import itertools

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def update_diagnostics(base_sd, expert_sds, ranks=(4, 8, 16, 32), router_rank=4) -> dict:
    names = [k for k in base_sd if k.endswith(".weight") and any(f".{p}." in k for p in PROJECTIONS)]
    energy = [{r: [] for r in ranks} for _ in expert_sds]
    overlap_by_proj = {p: [] for p in PROJECTIONS}
    for name in names:
        vs = []
        for i, sd in enumerate(expert_sds):
            delta = sd[name].double() - base_sd[name].double()
            _, s, vh = torch.linalg.svd(delta, full_matrices=False)
            e = s**2 / (s**2).sum().clamp(min=1e-30)
            for r in ranks:
                energy[i][r].append(e[:r].sum().item())
            vs.append(vh[:router_rank].T)  # (in, router_rank)
        proj = next(p for p in PROJECTIONS if f".{p}." in name)
        for a, b in itertools.combinations(vs, 2):
            overlap_by_proj[proj].append(((a.T @ b) ** 2).sum().item() / router_rank)
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    all_overlaps = [x for v in overlap_by_proj.values() for x in v]
    return {
        "energy": [{str(r): mean(v) for r, v in e.items()} for e in energy],
        "overlap": mean(all_overlaps),
        "overlap_by_proj": {p: mean(v) for p, v in overlap_by_proj.items()},
        "router_rank": router_rank,
        # random router_rank-dim subspaces of an n-dim space overlap by router_rank / n on average
        "overlap_random": {p: router_rank / base_sd[n].shape[1] for p in PROJECTIONS for n in names if f".{p}." in n},
    }
