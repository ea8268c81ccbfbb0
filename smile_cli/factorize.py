"""Truncated factorizations of a task update dW (out x in): the top singular triplets, in float32.

Every factorizer takes (delta, rank) and returns Factors with u (out, rank), s (rank,), vh (rank, in),
singular values in descending order, on delta's device. The rest of the tool sees only this interface.

Two methods:
- exact: thin LAPACK SVD of the whole matrix (minutes per large matrix on a CPU).
- randomized: a Halko-Martinsson-Tropp range finder (Gaussian sketch of rank + OVERSAMPLE columns, POWER_ITERATIONS
  power iterations re-orthonormalised with QR at every half step) and an SVD of the small projected matrix.
  With a decaying spectrum like fine-tuning updates, 2 power iterations give a rank-k error within ~1% of the
  optimal one (measured: docs/performance.md). The router's top gate_k directions come from the same, larger
  sketch (rank max(gate_k, k)), so they are as accurate as the expert's.
Both work on the tall orientation (a wide matrix is transposed first, and U and V swapped back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 2
# auto: randomized when the rank needed is at most this fraction of min(out, in); exact otherwise.
AUTO_RANK_FRACTION = 0.25


@dataclass
class Factors:
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def _tall(delta: torch.Tensor, rank: int, factorize_tall) -> Factors:
    """Factorize delta through its tall orientation (rows >= columns)."""
    delta = delta.float()
    if delta.shape[0] < delta.shape[1]:
        u_t, s, vh_t = factorize_tall(delta.T, rank)
        u, vh = vh_t.T, u_t.T
    else:
        u, s, vh = factorize_tall(delta, rank)
    return Factors(u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())


def _exact_tall(a: torch.Tensor, rank: int):
    return torch.linalg.svd(a, full_matrices=False)


def exact_svd(delta: torch.Tensor, rank: int) -> Factors:
    """Thin SVD with torch.linalg.svd (LAPACK is several times slower on wide inputs: tall orientation)."""
    return _tall(delta, rank, _exact_tall)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_tall(
    a: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, power_iterations: int = POWER_ITERATIONS, seed: int = 0
):
    """(U, S, Vh) with `rank` + oversample columns for a tall float32 matrix a (m x n, m >= n).

    The Gaussian test matrix comes from a CPU generator seeded with `seed` (the same on every device and in
    every process, so the result does not depend on which process factorizes which matrix)."""
    m, n = a.shape
    width = min(n, rank + oversample)
    if width >= n:  # the sketch would be as large as the matrix: nothing to gain
        return torch.linalg.svd(a, full_matrices=False)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(a.device)
    q = _orthonormal(a @ omega)  # (m, width)
    for _ in range(power_iterations):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)  # (width, n): small
    return q @ u_small, s, vh


def randomized_svd(delta: torch.Tensor, rank: int, *, seed: int = 0, **kwargs) -> Factors:
    return _tall(delta, rank, lambda a, r: randomized_tall(a, r, seed=seed, **kwargs))


def choose_method(svd: str, rank: int, shape: tuple[int, int]) -> str:
    """The factorization one matrix gets: `svd` itself, or for 'auto' randomized when rank is small."""
    if svd != "auto":
        return svd
    return "randomized" if rank <= AUTO_RANK_FRACTION * min(shape) else "exact"


def factorize(delta: torch.Tensor, rank: int, method: str, seed: int = 0) -> Factors:
    if method == "exact":
        return exact_svd(delta, rank)
    if method == "randomized":
        return randomized_svd(delta, rank, seed=seed)
    raise ValueError(f"unknown factorization {method!r}")


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-`rank` approximation of delta: sqrt(sum of s_i^2 for i > rank), from the
    exact singular values (no vectors: about 9 s for 14336 x 4096 on 2 cores; a float64 Gram matrix's eigenvalues
    cost more, a float32 one misstates the tail by about 1%)."""
    tall = delta.float() if delta.shape[0] >= delta.shape[1] else delta.float().T
    return torch.linalg.svdvals(tall).double()[rank:].square().sum().sqrt().item()


def relative_error(delta: torch.Tensor, factors: Factors) -> float:
    """Frobenius error of the rank-k approximation in factors, over the optimal rank-k error (costly: for a
    few sample matrices only). 1.0 is optimal."""
    delta = delta.float()
    approx_error = torch.linalg.matrix_norm(delta - (factors.u * factors.s) @ factors.vh).item()
    optimal = optimal_error(delta, factors.s.shape[0])
    if optimal == 0.0:
        return 1.0 if approx_error == 0.0 else float("inf")
    return approx_error / optimal
