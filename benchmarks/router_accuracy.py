"""Router subspace accuracy of the default factorization at Mistral-7B shapes, against the exact SVD and against
how far the exact router itself moves under bf16 rounding (the ceiling any tool can be held to).

For each projection kind (q, k, v, o, gate, up, down: out x in of one Mistral-7B layer) and each generator:
  lowrank:  tests/synthetic_family.py's `lowrank` update (rank-16 update + noise 5e-4 per entry);
  decaying: tests/synthetic_family.py's `decaying` update (256 terms decaying as exp(-i/40) from 0.02, + noise 2e-4 per
            entry: the noise's spectral norm exceeds the signal's top singular value, ~99% of the energy is noise);
  powerlaw: 256 terms s_i = 0.3 i^-0.5 (a slow power law: s8/s9 = 1.06) + noise 2e-5 per entry (spectral norm ~7x
            below s_256), about the Frobenius size of `decaying`'s update at 4096x4096 (1% of the base's);
one task update u (float32) is made, and, as a checkpoint stores it, the difference the tool factorizes:
d = bf16(W0 + u) - bf16(W0) for a base W0 = bf16(0.02 randn). Exact top singular vectors (thin LAPACK SVD,
cached under --cache: minutes per large matrix on 2 cores) of four matrices give the ceiling:
  u_vs_d:      u against d (what bf16 storage does to the exact router);
  d_vs_d2:     d against d2 = bf16(W0' + u) - bf16(W0') for another base W0' (two checkpoints of one fine-tune);
  u_vs_noisy:  u against u + Gaussian noise of the rms of d - u (a rounding-sized perturbation);
  ceiling = the smallest of the three. A router accuracy above the ceiling is not determined by the data.
Then, side by side in one run, at each rank of --ranks (rank = max(router rank, expert rank): 8 = routers of dense
or rank <= 8 experts, 128 = the default expert rank), on d (the tool's real input):
  before: the range finder of the release before issue 11 (rank + 10 columns, 2 power iterations)
  after:  smile_cli.factorize.randomized_svd (the default: at least 64 columns, 4 power iterations for such small
          sketches; 138 columns, 2 power iterations at rank 128)
and reports the smallest cosine of the principal angles between the top-8 router directions and exact(d)'s, the
share of the exact top-8 energy the router captures (||d V||_F^2 / sum of s_i^2, i <= 8), the Davis-Kahan lower
bound the model card reports (after), and the median time of --repeats runs.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smile_cli.factorize import randomized_svd, subspace_cosine_bound  # noqa: E402
from synthetic_family import PROJECTIONS, update  # noqa: E402

KINDS = {name.split(".")[-1]: shape(4096, 14336, 1024) for name, shape in PROJECTIONS.items()}  # Mistral-7B's
ROUTER = 8


def lowrank(shape, generator):
    return update(shape, generator, "lowrank")


def decaying(shape, generator):
    return update(shape, generator, "decaying")


def powerlaw(shape, generator, rank=256, alpha=0.5, top=0.3, noise=2e-5):
    """Structured directions with a slowly decaying (power-law) spectrum, s_i ~ top * i^-alpha, + small noise."""
    out_f, in_f = shape
    b = torch.randn(out_f, rank, generator=generator) / out_f**0.5
    a = torch.randn(rank, in_f, generator=generator) / in_f**0.5
    values = top * torch.arange(1, rank + 1, dtype=torch.float32) ** -alpha
    return (b * values) @ a + noise * torch.randn(shape, generator=generator)


GENERATORS = {"lowrank": lowrank, "decaying": decaying, "powerlaw": powerlaw}


def base(shape, seed: int) -> torch.Tensor:
    """A bf16 base weight like the benchmarks' (0.02 randn)."""
    return (0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(torch.bfloat16)


def stored(u: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """The update a tool sees when base and fine-tune are stored in bf16: bf16(W0 + u) - W0, in float32."""
    return (w0.float() + u).to(torch.bfloat16).float() - w0.float()


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
    del u, vh
    print(f"  exact SVD of {key}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save((top, s.clone()), path)
    return top, s


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.svdvals(a.double() @ b.double().T).min().item()


def energy(delta: torch.Tensor, vh: torch.Tensor, values: torch.Tensor) -> float:
    """||delta vh^T||_F^2 over the sum of the top g squared singular values: the share of the exact top-g
    subspace's energy that g router directions capture (1.0: as much as the exact router)."""
    captured = (delta.double() @ vh.double().T).square().sum()
    return (captured / values[: vh.shape[0]].double().square().sum()).item()


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def ceiling(u: torch.Tensor, seed: int, cache: Path, key: str, measure: bool) -> tuple[torch.Tensor, ...]:
    """Exact top directions of d = stored(u, W0), its singular values, and (when `measure`) how far the exact
    router moves under bf16 rounding (see the module's docstring)."""
    shape = tuple(u.shape)
    d = stored(u, base(shape, 1000 + seed))
    rounding = (d - u).square().mean().sqrt().item()
    exact_d, values_d = exact_top(d, cache, f"{key}-d")
    del d
    record = dict(
        s1=round(values_d[0].item(), 5),
        s8_over_s9_d=round((values_d[ROUTER - 1] / values_d[ROUTER]).item(), 4),
        rounding_rms=float(f"{rounding:.3g}"),
    )
    if not measure:
        return exact_d, values_d, dict(record, ceiling=None)
    exact_u, values_u = exact_top(u, cache, f"{key}-u")
    exact_d2, _ = exact_top(stored(u, base(shape, 2000 + seed)), cache, f"{key}-d2")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3000 + seed)).mul_(rounding)
    exact_noisy, _ = exact_top(noise.add_(u), cache, f"{key}-noisy")
    del noise
    record.update(
        s8_over_s9_u=round((values_u[ROUTER - 1] / values_u[ROUTER]).item(), 4),
        u_vs_d=round(min_cosine(exact_u[:ROUTER], exact_d[:ROUTER]), 5),
        d_vs_d2=round(min_cosine(exact_d[:ROUTER], exact_d2[:ROUTER]), 5),
        u_vs_noisy=round(min_cosine(exact_u[:ROUTER], exact_noisy[:ROUTER]), 5),
    )
    record["ceiling"] = min(record["u_vs_d"], record["d_vs_d2"], record["u_vs_noisy"])
    return exact_d, values_d, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="all", help="comma-separated of " + ",".join(KINDS))
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--ranks", default="8,128")
    parser.add_argument("--ceiling-kinds", default="all", help="kinds whose ceiling is measured (3 more SVDs each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/smile-router-accuracy"))
    parser.add_argument("--results", type=Path, help="JSON list of rows; rows of other (generator, kind, rank) kept")
    args = parser.parse_args()
    kinds = list(KINDS) if args.kinds == "all" else args.kinds.split(",")
    rows = json.loads(args.results.read_text()) if args.results and args.results.exists() else []
    for generator_name in args.generators.split(","):
        for kind in kinds:
            shape = KINDS[kind]
            seed = sorted(KINDS).index(kind) + 100 * list(GENERATORS).index(generator_name)
            u = GENERATORS[generator_name](shape, torch.Generator().manual_seed(seed))
            key = f"{generator_name}-{kind}-{shape[0]}x{shape[1]}"
            measure = args.ceiling_kinds == "all" or kind in args.ceiling_kinds.split(",")
            exact, values, bounds = ceiling(u, seed, args.cache, key, measure)
            d = stored(u, base(shape, 1000 + seed))
            del u
            for rank in map(int, args.ranks.split(",")):
                old, t_old = timed(lambda r=rank, d=d: before(d, r), args.repeats)
                new, t_new = timed(lambda r=rank, d=d: randomized_svd(d, r).vh, args.repeats)
                row = dict(generator=generator_name, kind=kind, shape=list(shape), rank=rank, **bounds)
                row.update(
                    before_min_cos=round(min_cosine(exact[:ROUTER], old[:ROUTER]), 5),
                    after_min_cos=round(min_cosine(exact[:ROUTER], new[:ROUTER]), 5),
                    before_energy=round(energy(d, old[:ROUTER], values), 5),
                    after_energy=round(energy(d, new[:ROUTER], values), 5),
                    after_bound=round(subspace_cosine_bound(d, new[:ROUTER], values.double()), 5),
                    before_s=round(t_old, 3),
                    after_s=round(t_new, 3),
                    time_ratio=round(t_new / t_old, 3),
                )
                print(json.dumps(row), flush=True)
                same = (generator_name, kind, rank)
                rows = [r for r in rows if (r["generator"], r["kind"], r["rank"]) != same] + [row]
                if args.results:
                    args.results.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
