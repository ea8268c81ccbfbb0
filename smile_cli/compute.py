"""Where and how task updates are factorized: the device, the method per matrix, and a quality check.

The quality check measures, for the first upscaled linear of each shape (first expert), the Frobenius error of
the kept rank-k factors against the optimal rank-k error, and how close the router's directions are to the exact
top right singular subspace (a guaranteed lower bound on the smallest principal cosine): from the exact singular
values, a few exact computations per run, on one thread (the model card reports them: same bytes on any thread
count).
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from smile_cli.factorize import (
    EXACT_MAX_SIDE,
    MIN_SKETCH,
    OVERSAMPLE,
    POWER_ITERATIONS,
    SMALL_SKETCH_POWER_ITERATIONS,
    Factors,
    choose_method,
    factorize,
    relative_error,
    singular_values,
    subspace_cosine_bound,
    zero_factors,
)
from smile_cli.naming import module_kind


def resolve_device(name: str) -> torch.device:
    """auto: the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from smile_cli.errors import InputError

        raise InputError(f"--device {name}: CUDA is not available here")
    return device


class UpdateFactorizer:
    """Factorizes task updates with the options' method, seed and device; keeps a record of what it did."""

    def __init__(self, svd: str, seed: int, device: str, check_modules: dict[str, int] | None = None):
        """check_modules: the modules whose factorization is checked (expert 0), with their router ranks."""
        self.svd, self.seed, self.device = svd, seed, resolve_device(device)
        self.check_modules = dict(check_modules or {})
        self.methods: Counter = Counter()
        self.checks: list[dict] = []
        self.seconds = {"factorize": 0.0, "check": 0.0}

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor on the compute device; host-to-GPU copies go through pinned memory."""
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def __call__(self, delta: torch.Tensor, rank: int) -> Factors:
        """Top `rank` singular triplets of delta (on the compute device), returned on the CPU."""
        method = choose_method(self.svd, rank, tuple(delta.shape))
        self.methods[method] += 1
        started = time.perf_counter()
        factors = factorize(delta, rank, method, self.seed, invariant=self.svd != "exact")
        self._sync()
        self.seconds["factorize"] += time.perf_counter() - started
        if factors.u.device.type != "cpu":
            factors = Factors(factors.u.cpu(), factors.s.cpu(), factors.vh.cpu())
        return factors

    def checks_module(self, module: str) -> bool:
        """Whether module's factorization is still to be checked (expert 0's: Wanted.checked, then check)."""
        return module in self.check_modules

    def check(self, module: str, delta: torch.Tensor, factors: Factors) -> None:
        """Record the quality check of module's factorization: delta (on the compute device) and the factors this
        factorizer gave for it (at the rank it was asked for). Once per module."""
        started = time.perf_counter()
        method = choose_method(self.svd, factors.s.shape[0], tuple(delta.shape))
        on_device = Factors(*(t.to(delta.device) for t in (factors.u, factors.s, factors.vh)))
        self.checks.append(check(delta, on_device, self.check_modules.pop(module), module, method))
        self.seconds["check"] += time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self) -> dict:
        report = svd_report(self.svd, self.seed, str(self.device), dict(self.methods), self.checks)
        report["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return report


def check(delta: torch.Tensor, factors: Factors, router: int, module: str, method: str) -> dict:
    """The quality check of one factorization (see the module's docstring); router: the router rank (0: none)."""
    values = singular_values(delta)
    record = dict(module=module, expert=0, rank=factors.s.shape[0], method=method)
    record["error_ratio"] = round(relative_error(delta, factors, values), 5)
    if router:
        record["router_rank"] = router
        record["router_min_cosine"] = round(subspace_cosine_bound(delta, factors.vh[:router], values), 5)
    return record


def svd_report(svd: str, seed: int, device: str, methods: dict, checks: list[dict]) -> dict:
    """What the summary and the model card say about the factorization."""
    checks = sorted(checks, key=lambda c: module_kind(c["module"]))
    cosines = [c["router_min_cosine"] for c in checks if "router_min_cosine" in c]
    return {
        "svd": svd,
        "methods": methods,
        "randomized": {
            "oversample": OVERSAMPLE,
            "min_sketch": MIN_SKETCH,
            "power_iterations": POWER_ITERATIONS,
            "small_sketch_power_iterations": SMALL_SKETCH_POWER_ITERATIONS,
            "seed": seed,
        },
        "auto_exact_max_side": EXACT_MAX_SIDE,
        "device": device,
        "error_ratio_checks": checks,
        "max_error_ratio": max((c["error_ratio"] for c in checks), default=None),
        "min_router_cosine": min(cosines, default=None),
    }


def factorize_update(delta: torch.Tensor, rank: int, factorize) -> tuple[Factors, bool]:
    """(top `rank` singular triplets of delta, whether delta is all zeros). An all-zero update (an expert equal
    to the base in this layer) gets all-zero factors: its router rows are zero, so it never wins against a real
    update, and it adds nothing when chosen (an SVD of zero returns arbitrary directions). Zero is read off the
    largest singular value, which costs nothing, rather than from a pass over delta."""
    if rank == 0:  # dense experts with one expert: nothing to factorize
        return zero_factors(tuple(delta.shape), 0), not delta.any()
    factors = factorize(delta, rank)
    if factors.s[0] > 0:
        return factors, False
    return zero_factors(tuple(delta.shape), rank), True
