"""Router subspace accuracy and speed of the randomized factorization at Mistral-7B shapes, before and after issue 11.

For each projection kind (q, k, v, o, gate, up, down: out x in of one Mistral-7B layer) and each generator of the
benchmarks (`lowrank`: benchmarks/synthetic.py's rank-16 update + noise; `decaying`: benchmarks/upscale_mistral.py's
exponentially decaying 256-term update + noise), one task update is made; its exact top right singular vectors
come from a thin LAPACK SVD (cached under --cache: minutes per large matrix on 2 cores). Then, side by side in one
run, at each rank of --ranks (rank = max(router rank, expert rank): 8 = routers of dense or rank <= 8 experts, 128 =
the default expert rank):
  before: the range finder of the previous release (rank + 10 columns, 2 power iterations, QR and SVD on every thread)
  after:  smile_cli.factorize.randomized_svd (at least 64 columns, 4 power iterations for such small sketches; QR and
          small SVD on one thread: the same bytes on any thread count)
and reports the smallest cosine of the principal angles between the top-8 router directions and the exact ones,
the Davis-Kahan lower bound the model card reports (after), and the median time of --repeats runs.

  python benchmarks/router_accuracy.py --kinds all --ranks 8,128 --results docs/results/router_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smile_cli.factorize import randomized_svd, subspace_cosine_bound  # noqa: E402
from upscale_mistral import PROJECTIONS, update  # noqa: E402

KINDS = {name.split(".")[-1]: shape for name, shape in PROJECTIONS.items()}
ROUTER = 8


def lowrank(shape, generator):
    """benchmarks/synthetic.py's expert update: a rank-16 update plus noise."""
    b = torch.randn(shape[0], 16, generator=generator)
    a = torch.randn(16, shape[1], generator=generator)
    return 0.002 * (b @ a) / 4 + 0.0005 * torch.randn(shape, generator=generator)


GENERATORS = {"lowrank": lowrank, "decaying": update}


def before(delta: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """The previous release's randomized SVD (rank + 10 columns, 2 power iterations); returns vh (rank x in)."""
    a = delta if delta.shape[0] >= delta.shape[1] else delta.T
    n = a.shape[1]
    omega = torch.randn(n, min(n, rank + 10), generator=torch.Generator().manual_seed(seed))
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(2):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u_small, _, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (vh if delta.shape[0] >= delta.shape[1] else (q @ u_small).T)[:rank]


def exact_top(delta: torch.Tensor, cache: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(top 16 right singular vectors as rows, every singular value) of delta, cached."""
    path = cache / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    started = time.perf_counter()
    tall = delta.shape[0] >= delta.shape[1]
    u, s, vh = torch.linalg.svd(delta if tall else delta.T, full_matrices=False)
    top = (vh[:16] if tall else u[:, :16].T).clone()
    print(f"  exact SVD of {key}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save((top, s.clone()), path)
    return top, s


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.svdvals(a.double() @ b.double().T).min().item()


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="all", help="comma-separated of " + ",".join(KINDS))
    parser.add_argument("--generators", default="lowrank,decaying")
    parser.add_argument("--ranks", default="8,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/smile-router-accuracy"))
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
    rows = []
    for generator_name in args.generators.split(","):
        for kind in kinds:
            shape = KINDS[kind]
            seed = sorted(KINDS).index(kind) + 100 * list(GENERATORS).index(generator_name)
            delta = GENERATORS[generator_name](shape, torch.Generator().manual_seed(seed))
            exact, values = exact_top(delta, args.cache, f"{generator_name}-{kind}-{shape[0]}x{shape[1]}")
            for rank in map(int, args.ranks.split(",")):
                old, t_old = timed(lambda r=rank, d=delta: before(d, r), args.repeats)
                new, t_new = timed(lambda r=rank, d=delta: randomized_svd(d, r).vh, args.repeats)
                row = dict(
                    generator=generator_name,
                    kind=kind,
                    shape=list(shape),
                    rank=rank,
                    s8_over_s9=round((values[ROUTER - 1] / values[ROUTER]).item(), 4),
                    before_min_cos=round(min_cosine(exact[:ROUTER], old[:ROUTER]), 5),
                    after_min_cos=round(min_cosine(exact[:ROUTER], new[:ROUTER]), 5),
                    after_bound=round(subspace_cosine_bound(delta, new[:ROUTER], values.double()), 5),
                    before_s=round(t_old, 3),
                    after_s=round(t_new, 3),
                    time_ratio=round(t_new / t_old, 3),
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.results:
        args.results.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
