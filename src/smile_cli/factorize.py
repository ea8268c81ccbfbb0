"""Truncated factorizations of a task update dW (out x in): the top singular triplets, in float32.

Every factorizer takes (delta, rank) and returns Factors with u (out, rank), s (rank,), vh (rank, in),
singular values in descending order. The rest of the tool sees only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def exact_svd(delta: torch.Tensor, rank: int) -> Factors:
    """Thin SVD with torch.linalg.svd, always of the tall orientation (a wide matrix is transposed first:
    LAPACK is several times slower on wide inputs), truncated to `rank`."""
    delta = delta.float()
    if delta.shape[0] < delta.shape[1]:
        u_t, s, vh_t = torch.linalg.svd(delta.T, full_matrices=False)
        u, vh = vh_t.T, u_t.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return Factors(u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())


FACTORIZERS = {"exact": exact_svd}
