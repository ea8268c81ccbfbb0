"""Forward latency of upscaled Mistral-7B-shaped projections: nn.Linear vs SmileLinear vs a naive per-expert loop.

T=3 experts, router rank 8, expert rank 128, top-1, one batch of 1 x 512 tokens on the CPU. The three are timed
interleaved (round robin), median of --runs, so machine noise hits them alike.

  python benchmarks/layer_forward.py --runs 7 --dtypes float32,bfloat16

--tokens 1 is one decode step at batch 1. --before FILE adds the SmileLinear of another modeling_smile.py (e.g.
`git show REV:smile_cli/modeling/modeling_smile.py > FILE`) with the same parameters, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from smile_cli.modeling.modeling_smile import SmileLinear

SHAPES = {"q_proj": (4096, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}  # (out, in)
T, ROUTER_RANK, EXPERT_RANK = 3, 8, 128


def naive_forward(layer: SmileLinear, x: torch.Tensor) -> torch.Tensor:
    """Per-expert loop with gather/scatter: the tokens routed to expert i go through its factors only."""
    y = layer.shared_linear(x)
    weights = layer.router(x)
    chosen = weights.argmax(dim=1)
    k = layer.rank_of_expert
    for i in range(layer.num_experts):
        rows = (chosen == i).nonzero().squeeze(1)
        if rows.numel():
            xi = x.index_select(0, rows)
            hidden = xi @ layer.experts_svh[i * k : (i + 1) * k].T
            yi = hidden @ layer.experts_u[:, i * k : (i + 1) * k].T
            y.index_add_(0, rows, yi * weights[rows, i : i + 1].to(yi.dtype))
    return y


def load_modeling(path: Path):
    """Another modeling_smile.py as a module (in a package of its own, next to this checkout's configuration)."""
    package = Path(tempfile.mkdtemp()) / "before_modeling"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copyfile(path, package / "modeling_smile.py")
    here = Path(__file__).resolve().parent.parent / "smile_cli" / "modeling" / "configuration_smile.py"
    shutil.copyfile(here, package / "configuration_smile.py")
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("before_modeling.modeling_smile")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--before", type=Path, default=None, help="another modeling_smile.py to time")
    args = parser.parse_args()
    before = load_modeling(args.before) if args.before else None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tokens {args.tokens}, T={T}, "
        f"router rank {ROUTER_RANK}, expert rank {EXPERT_RANK}, median of {args.runs}"
    )
    extra = " before ms | ratio |" if before else ""
    print("| dtype | layer (out x in) | nn.Linear ms | SmileLinear ms | ratio | naive loop ms | ratio |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if before else ""))
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for name, (out_f, in_f) in SHAPES.items():
            torch.manual_seed(0)
            layer = SmileLinear(in_f, out_f, False, T, 1, ROUTER_RANK, EXPERT_RANK)
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(0, 0.02)
            layer = layer.to(dtype)
            layer.router.float()
            base = layer.shared_linear
            x = torch.randn(1, args.tokens, in_f).to(dtype)
            cases = {
                "base": lambda b=base, x=x: b(x),
                "smile": lambda m=layer, x=x: m(x),
                "naive": lambda m=layer, x=x: naive_forward(m, x[0]),
            }
            if before:
                old = before.SmileLinear(in_f, out_f, False, T, 1, ROUTER_RANK, EXPERT_RANK).to(dtype)
                old.load_state_dict(layer.state_dict())
                old.router.float()
                cases["before"] = lambda m=old, x=x: m(x)
            times = {k: [] for k in cases}
            with torch.inference_mode():
                torch.testing.assert_close(cases["smile"]()[0], cases["naive"](), rtol=2e-2, atol=2e-2)
                if before:
                    torch.testing.assert_close(cases["smile"](), cases["before"](), rtol=1e-2, atol=1e-3)
                for _ in range(args.runs + 1):  # first round is warm-up
                    for key, fn in cases.items():
                        started = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - started)
            med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} ({out_f}x{in_f}) | {med['base']:.2f} | "
                f"{med['smile']:.2f} | {med['smile'] / med['base']:.2f} | {med['naive']:.2f} | "
                f"{med['naive'] / med['base']:.2f} |"
                + (f" {med['before']:.2f} | {med['before'] / med['base']:.2f} |" if before else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
