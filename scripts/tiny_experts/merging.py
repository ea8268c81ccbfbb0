"""Weight-merging baselines on state dicts: simple average, task arithmetic and TIES-merging.

All three work on task vectors tau_i = theta_i - theta_0 (float32), over every floating-point tensor:
    simple average     theta_0 + mean_i tau_i
    task arithmetic    theta_0 + lam * sum_i tau_i                   (Ilharco et al., 2023)
    TIES               theta_0 + lam * disjoint_mean(elect(trim(tau)))  (Yadav et al., 2023):
        trim   keep the top `density` share of each task vector's entries by magnitude (over the whole
               flattened task vector), zero the rest
        elect  per entry, the sign of the sum of the trimmed task vectors
        merge  per entry, the mean of the trimmed values that agree with the elected sign (zeros excluded)
"""

import torch


def task_vectors(base_sd: dict, expert_sds: list[dict]) -> list[dict]:
    keys = [k for k, v in base_sd.items() if v.is_floating_point()]
    return [{k: sd[k].float() - base_sd[k].float() for k in keys} for sd in expert_sds]


def _apply(base_sd: dict, update: dict, scale: float) -> dict:
    return {k: (v.float() + scale * update[k]).to(v.dtype) if k in update else v for k, v in base_sd.items()}


def simple_average(base_sd, expert_sds):
    tvs = task_vectors(base_sd, expert_sds)
    return _apply(base_sd, {k: sum(tv[k] for tv in tvs) / len(tvs) for k in tvs[0]}, 1.0)


def task_arithmetic(base_sd, expert_sds, lam: float):
    tvs = task_vectors(base_sd, expert_sds)
    return _apply(base_sd, {k: sum(tv[k] for tv in tvs) for k in tvs[0]}, lam)


def _trim(tv: dict, density: float) -> dict:
    flat = torch.cat([v.flatten() for v in tv.values()]).abs()
    n_keep = max(1, int(density * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - n_keep + 1).values  # the n_keep-th largest magnitude
    return {k: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for k, v in tv.items()}


def ties_update(base_sd, expert_sds, density: float = 0.2) -> dict:
    trimmed = [_trim(tv, density) for tv in task_vectors(base_sd, expert_sds)]
    update = {}
    for k in trimmed[0]:
        stacked = torch.stack([tv[k] for tv in trimmed])  # (T, ...)
        sign = torch.sign(stacked.sum(dim=0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        total = (stacked * agree).sum(dim=0)
        count = agree.sum(dim=0).clamp(min=1)
        update[k] = total / count
    return update


def ties(base_sd, expert_sds, lam: float, density: float = 0.2, update: dict | None = None):
    """TIES-merged state dict; pass a precomputed ties_update() to sweep lam cheaply."""
    update = ties_update(base_sd, expert_sds, density) if update is None else update
    return _apply(base_sd, update, lam)
