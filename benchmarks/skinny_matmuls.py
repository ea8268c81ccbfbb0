"""One decode token through the matmuls a SmileLinear adds, against the base's nn.Linear: where bf16 loses.

Per shape (Mistral-like at hidden 2048: k/v 2048->512, q/o 2048->2048, gate/up 2048->5632, down 5632->2048) and
dtype, the median of 400 calls (after 30 warm-up calls) of: the base matmul; the float32 router (T=3 x rank 8
rows); one expert's S V^T rows (rank 128) as F.linear, torch.mv and in float32; its U columns as addmm_, F.linear
and torch.mv; and the base + one expert as SmileLinear computes it (F.linear then addmm_). Microseconds.

  OMP_NUM_THREADS=1 python benchmarks/skinny_matmuls.py
"""

import time

import torch
import torch.nn.functional as F


def median_us(f, n=400):
    for _ in range(30):
        f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[n // 2] * 1e6


def row(dtype, i, o) -> dict:
    w, x = torch.randn(o, i).to(dtype), torch.randn(1, i).to(dtype)
    svh, u, router = torch.randn(384, i).to(dtype), torch.randn(o, 384).to(dtype), torch.randn(24, i)
    s1, u1 = svh[:128], u[:, :128]
    h = F.linear(x, s1)
    return dict(
        base=median_us(lambda: F.linear(x, w)),
        router_f32=median_us(lambda: F.linear(x.float(), router)),
        svh_linear=median_us(lambda: F.linear(x, s1)),
        svh_mv=median_us(lambda: torch.mv(s1, x[0])),
        svh_f32=median_us(lambda: F.linear(x.float(), s1.float())),
        u_addmm=median_us(lambda: torch.empty(1, o, dtype=dtype).addmm_(h, u1.T, beta=0)),
        u_linear=median_us(lambda: F.linear(h, u1)),
        u_mv=median_us(lambda: torch.mv(u1, h[0])),
        smile_now=median_us(lambda: F.linear(x, w).addmm_(F.linear(x, s1), u1.T)),
    )


def main():
    torch.manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for i, o in [(2048, 512), (2048, 2048), (2048, 5632), (5632, 2048)]:
                times = {k: round(v, 1) for k, v in row(dtype, i, o).items()}
                print(str(dtype).removeprefix("torch."), i, o, times, flush=True)


if __name__ == "__main__":
    main()
