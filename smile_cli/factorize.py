"""Truncated factorizations of a task update dW (out x in): the top singular triplets, in float32.

Every factorizer takes (delta, rank) and returns Factors with u (out, rank), s (rank,), vh (rank, in),
singular values in descending order, on delta's device. The rest of the tool sees only this interface.

Two methods:
- exact: thin LAPACK SVD of the whole matrix (minutes per large matrix on a CPU).
- randomized: a Halko-Martinsson-Tropp range finder (a Gaussian sketch of max(rank + OVERSAMPLE, MIN_SKETCH)
  columns, POWER_ITERATIONS power iterations, SMALL_SKETCH_POWER_ITERATIONS for a sketch of at most MIN_SKETCH
  columns, re-orthonormalised with QR at every half step) and an SVD of the small projected matrix. With a decaying
  spectrum like fine-tuning updates, 2 power iterations give a rank-k error within ~1% of the optimal one. The
  router's top gate_k directions come from the same sketch (rank max(gate_k, k)); a small rank gets a sketch of at
  least MIN_SKETCH columns and more power iterations, because a subspace (the router) needs a more accurate
  sketch than a reconstruction does (measured: docs/performance.md).
Both work on the tall orientation (a wide matrix is transposed first, and U and V swapped back).

Thread counts: a matrix product gives the same bytes with any number of threads (MKL and OpenBLAS partition its
output, never its sums), LAPACK's QR and SVD do not. The randomized method does its large products with every
thread and its QRs and small SVD on one thread (see single_threaded), so its result does not depend on the thread
count. `exact` with invariant=True (what --svd auto chooses) also runs on one thread; `--svd exact` uses every
thread and its bytes may change with the thread count (the manifest records it: output.numerics).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 2
MIN_SKETCH = 64  # columns of the smallest sketch: the router's top directions need them (docs/performance.md)
SMALL_SKETCH_POWER_ITERATIONS = 4  # for sketches of at most MIN_SKETCH columns: cheap there, and routers need them
# auto: randomized when the rank needed is at most this fraction of min(out, in), and the matrix is larger than
# EXACT_MAX_SIDE on both sides; exact otherwise (a small matrix's exact SVD costs well under a second).
AUTO_RANK_FRACTION = 0.25
EXACT_MAX_SIDE = 512


@contextlib.contextmanager
def single_threaded():
    """Run LAPACK (QR, SVD, eigenvalues) on one thread: its result then does not depend on the process's thread
    count (OMP_NUM_THREADS, torchrun's 1 per process). Restores the thread count afterwards."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Factors:
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def zero_factors(shape: tuple[int, int], rank: int) -> Factors:
    """`rank` all-zero singular triplets (float32) of an out x in matrix: a zero update's factors (its router rows
    are zero, so it never wins), and what exact factors of a smaller rank are padded with."""
    out_features, in_features = shape
    return Factors(torch.zeros(out_features, rank), torch.zeros(rank), torch.zeros(rank, in_features))


def _tall(delta: torch.Tensor, rank: int, factorize_tall) -> Factors:
    """Factorize delta through its tall orientation (rows >= columns)."""
    delta = delta.float()
    if delta.shape[0] < delta.shape[1]:
        u_t, s, vh_t = factorize_tall(delta.T, rank)
        u, vh = vh_t.T, u_t.T
    else:
        u, s, vh = factorize_tall(delta, rank)
    return Factors(u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())


def exact_svd(delta: torch.Tensor, rank: int, invariant: bool = False) -> Factors:
    """Thin SVD with torch.linalg.svd (LAPACK is several times slower on wide inputs: tall orientation); on one
    thread when `invariant` (the same bytes whatever the thread count), else on every thread."""
    threads = single_threaded() if invariant else contextlib.nullcontext()
    with threads:
        return _tall(delta, rank, lambda a, r: torch.linalg.svd(a, full_matrices=False))


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    with single_threaded():
        return torch.linalg.qr(y, mode="reduced").Q


def sketch_size(rank: int, n: int) -> tuple[int, int]:
    """(columns, power iterations) of the randomized sketch for `rank` triplets of a matrix with n columns."""
    width = min(n, max(rank + OVERSAMPLE, MIN_SKETCH))
    return width, SMALL_SKETCH_POWER_ITERATIONS if width <= MIN_SKETCH else POWER_ITERATIONS


def randomized_tall(
    a: torch.Tensor, rank: int, *, width: int | None = None, power_iterations: int | None = None, seed: int = 0
):
    """(U, S, Vh) with `width` columns (default: sketch_size) for a tall float32 matrix a (m x n, m >= n).

    The Gaussian test matrix comes from a CPU generator seeded with `seed` (the same on every device and in
    every process, so the result does not depend on which process factorizes which matrix)."""
    m, n = a.shape
    default_width, default_iterations = sketch_size(rank, n)
    width = min(n, width or default_width)
    power_iterations = default_iterations if power_iterations is None else power_iterations
    if width >= n:  # the sketch would be as large as the matrix: nothing to gain
        with single_threaded():
            return torch.linalg.svd(a, full_matrices=False)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(a.device)
    q = _orthonormal(a @ omega)  # (m, width)
    for _ in range(power_iterations):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    small = q.T @ a  # (width, n): small
    with single_threaded():
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return q @ u_small, s, vh


def randomized_svd(delta: torch.Tensor, rank: int, *, seed: int = 0, **kwargs) -> Factors:
    return _tall(delta, rank, lambda a, r: randomized_tall(a, r, seed=seed, **kwargs))


def choose_method(svd: str, rank: int, shape: tuple[int, int]) -> str:
    """The factorization one matrix gets: `svd` itself, or for 'auto' randomized when rank is small and the
    matrix is not (exact where it is cheap)."""
    if svd != "auto":
        return svd
    small_rank = rank <= AUTO_RANK_FRACTION * min(shape)
    return "randomized" if small_rank and min(shape) > EXACT_MAX_SIDE else "exact"


def factorize(delta: torch.Tensor, rank: int, method: str, seed: int = 0, invariant: bool = True) -> Factors:
    """`invariant`: exact SVDs on one thread (randomized ones always give the same bytes on any thread count)."""
    if method == "exact":
        return exact_svd(delta, rank, invariant=invariant)
    if method == "randomized":
        return randomized_svd(delta, rank, seed=seed)
    raise ValueError(f"unknown factorization {method!r}")


def _tall_float(delta: torch.Tensor) -> torch.Tensor:
    return delta.float() if delta.shape[0] >= delta.shape[1] else delta.float().T


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Every singular value of delta, in float64, computed on one thread (no vectors: about 9 s for
    14336 x 4096 on 2 cores; a float64 Gram matrix's eigenvalues cost more, a float32 one misstates the tail by
    about 1%)."""
    with single_threaded():
        return torch.linalg.svdvals(_tall_float(delta)).double()


def optimal_error(delta: torch.Tensor, rank: int, values: torch.Tensor | None = None) -> float:
    """Frobenius error of the best rank-`rank` approximation of delta: sqrt(sum of s_i^2 for i > rank)."""
    values = singular_values(delta) if values is None else values
    return values[rank:].square().sum().sqrt().item()


def relative_error(delta: torch.Tensor, factors: Factors, values: torch.Tensor | None = None) -> float:
    """Frobenius error of the rank-k approximation in factors, over the optimal rank-k error (costly: for a
    few sample matrices only). 1.0 is optimal. `values`: delta's singular values, when known."""
    delta = delta.float()
    with single_threaded():  # a norm is a sum: its rounding would follow the thread count
        approx_error = torch.linalg.matrix_norm(delta - (factors.u * factors.s) @ factors.vh).item()
    optimal = optimal_error(delta, factors.s.shape[0], values)
    if optimal == 0.0:
        return 1.0 if approx_error == 0.0 else float("inf")
    return approx_error / optimal


def subspace_cosine_bound(delta: torch.Tensor, vh: torch.Tensor, values: torch.Tensor | None = None) -> float:
    """A guaranteed lower bound on the smallest cosine of the principal angles between the rows of vh (g
    orthonormal directions, e.g. a router's) and delta's exact top-g right singular subspace: 1.0 means exact.

    Davis-Kahan's sin-theta theorem for M = delta^T delta: with V the (n x g) directions, H = V^T M V and
    R = M V - V H, ||sin theta||_2 <= ||R||_2 / (lambda_min(H) - s_{g+1}^2) when that gap is positive (else no
    bound: 0.0). Costs two products with delta (float64) and delta's singular values (`values`, when known)."""
    g = vh.shape[0]
    values = singular_values(delta) if values is None else values
    if g == 0 or values[0] == 0:
        return 1.0
    a = delta.double()
    with single_threaded():
        v = torch.linalg.qr(vh.double().T).Q  # (n, g): orthonormal to float64 precision
        av = a @ v
        h = av.T @ av
        residual = a.T @ av - v @ h
        gap = torch.linalg.eigvalsh(h)[0].item() - (values[g].item() ** 2 if g < values.numel() else 0.0)
        norm = torch.linalg.matrix_norm(residual, ord=2).item()
    if gap <= 0:
        return 0.0
    sine = min(1.0, norm / gap)
    return (1.0 - sine * sine) ** 0.5


@functools.cache
def math_library() -> str:
    """The linear algebra a CPU factorization runs on, e.g. 'torch 2.13.0, MKL 2024.2, AVX512'."""
    import re

    shown = torch.__config__.show()
    found = re.search(r"Math Kernel Library Version (\S+?)-", shown)
    library = f"MKL {found.group(1)}" if found else "BLAS " + (re.search(r"BLAS_INFO=(\w+)", shown) or [0, "?"])[1]
    return f"torch {torch.__version__}, {library}, {torch.backends.cpu.get_cpu_capability()}"


def numerics(svd: str) -> dict:
    """What the output's bytes depend on besides the inputs and options (the manifest records it; --resume and
    assemble refuse to mix outputs whose records differ): the math library, and for --svd exact, whose LAPACK SVDs
    run on every thread, the thread count. --svd auto and randomized give the same bytes on any thread count."""
    record = {"math": math_library()}
    if svd == "exact":
        record["threads"] = torch.get_num_threads()
    return record
