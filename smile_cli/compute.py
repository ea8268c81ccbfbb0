"""Where and how task updates are factorized: the device, the method per matrix, and a quality check.

The quality check compares, for the first upscaled linear of each shape (first expert), the Frobenius error of
the kept rank-k factors with the optimal rank-k error (exact singular values): a few exact computations per run.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from smile_cli.factorize import OVERSAMPLE, POWER_ITERATIONS, Factors, choose_method, factorize, relative_error
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

    def __init__(self, svd: str, seed: int, device: str, check_modules: set[str] = frozenset()):
        self.svd, self.seed, self.device = svd, seed, resolve_device(device)
        self.check_modules = set(check_modules)
        self.methods: Counter = Counter()
        self.checks: list[dict] = []
        self.seconds = {"factorize": 0.0, "check": 0.0}

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor on the compute device; host-to-GPU copies go through pinned memory."""
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def __call__(self, delta: torch.Tensor, rank: int, module: str, expert: int) -> Factors:
        """Top `rank` singular triplets of delta (on the compute device), returned on the CPU."""
        method = choose_method(self.svd, rank, tuple(delta.shape))
        self.methods[method] += 1
        started = time.perf_counter()
        factors = factorize(delta, rank, method, self.seed)
        self._sync()
        checked = time.perf_counter()
        self.seconds["factorize"] += checked - started
        if expert == 0 and module in self.check_modules:
            self.check_modules.discard(module)
            error = relative_error(delta, factors)
            self.checks.append(dict(module=module, expert=0, rank=rank, method=method, error_ratio=round(error, 5)))
            self.seconds["check"] += time.perf_counter() - checked
        if factors.u.device.type != "cpu":
            factors = Factors(factors.u.cpu(), factors.s.cpu(), factors.vh.cpu())
        return factors

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self) -> dict:
        report = svd_report(self.svd, self.seed, str(self.device), dict(self.methods), self.checks)
        report["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return report


def svd_report(svd: str, seed: int, device: str, methods: dict, checks: list[dict]) -> dict:
    """What the summary and the model card say about the factorization."""
    checks = sorted(checks, key=lambda c: module_kind(c["module"]))
    return {
        "svd": svd,
        "methods": methods,
        "randomized": {"oversample": OVERSAMPLE, "power_iterations": POWER_ITERATIONS, "seed": seed},
        "device": device,
        "error_ratio_checks": checks,
        "max_error_ratio": max((c["error_ratio"] for c in checks), default=None),
    }


def factorize_update(delta: torch.Tensor, rank: int, factorize) -> tuple[Factors, bool]:
    """(top `rank` singular triplets of delta, whether delta is all zeros). An all-zero update (an expert equal
    to the base in this layer) gets all-zero factors: its router rows are zero, so it never wins against a real
    update, and it adds nothing when chosen (an SVD of zero returns arbitrary directions). Zero is read off the
    largest singular value, which costs nothing, rather than from a pass over delta."""
    out_features, in_features = delta.shape
    zeros = torch.zeros(out_features + 1 + in_features, rank)
    zero_factors = Factors(zeros[:out_features], zeros[out_features], zeros[out_features + 1 :].T)
    if rank == 0:  # dense experts with one expert: nothing to factorize
        return zero_factors, not delta.any()
    factors = factorize(delta, rank)
    if factors.s[0] > 0:
        return factors, False
    return zero_factors, True
