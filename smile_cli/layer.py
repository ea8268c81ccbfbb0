"""SMILE's construction of one layer (Tang et al. 2408.10174): tensors in (the base weight and bias, each expert's
task update of the layer: inputs/experts.py), SmileLinear's parameters out, in the checkpoint's order
(plan.linear_outputs; their names and shapes: modeling_smile.smile_linear_shapes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from smile_cli.inputs.experts import TaskUpdate, kept_rank
from smile_cli.plan import LinearRanks


def smile_layer(
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    updates: Iterable[TaskUpdate],
    ranks: LinearRanks,
) -> Iterator[tuple[str, torch.Tensor]]:
    """SMILE's upscaling of one linear: (SmileLinear parameter name, tensor) in checkpoint order.

    The base weight and bias become the shared linear; expert i keeps the top ranks.experts[i] triplets of its
    update as experts_u (U_k) and experts_svh (S_k V_k^T), or its whole update (ranks.experts all 0: dense,
    yielded as one experts_delta block per expert, in order), or fewer where the update's numerical rank is
    below (kept_rank: experts_svh and experts_u are then smaller than planned); its router rows are the top
    ranks.router right singular vectors (with several experts); experts_bias holds the bias changes. `updates` is
    consumed lazily, one at a time (each needs: factors of rank >= ranks.factor_rank_of(i); dense with dense experts;
    bias when base_bias is given). Tensors come out in the dtype they came in: the caller converts them."""
    num_experts, dense = len(ranks.experts), ranks.experts[0] == 0
    yield "shared_linear.weight", base_weight
    if base_bias is not None:
        yield "shared_linear.bias", base_bias
    routers, svhs, us, biases = [], [], [], []
    for index, update in enumerate(updates):
        factors = update.factors
        if num_experts > 1:
            routers.append(factors.vh[: ranks.router])
        if dense:
            yield "experts_delta", update.dense
        else:
            k = kept_rank(ranks.experts[index], update)
            svhs.append(factors.s[:k, None] * factors.vh[:k])
            us.append(factors.u[:, :k])
        if base_bias is not None:
            biases.append(update.bias)
        del update, factors  # the next update is computed with this one's dense matrix gone
    if not dense:
        yield "experts_svh", torch.cat(svhs)
        yield "experts_u", torch.cat(us, dim=1)
    if base_bias is not None:
        yield "experts_bias", torch.stack(biases)
    if num_experts > 1:
        yield "router.weight", torch.cat(routers)
