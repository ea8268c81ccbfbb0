"""Upscale Mistral-7B-shaped models with few layers: this tool against a reference-style pipeline and the I/O floor.

Generates base + 3 experts (bfloat16; hidden 4096, intermediate 14336, 8 kv heads x 128, vocab 32000; the shared
generator tests/synthetic_family.py, `--spectrum`) under --root, then runs each case in a subprocess (wall time,
peak RSS: the run's own VmHWM, tests/peak_rss.py), with the 1-minute load average before and after each case:
  smile:            `python -m smile_cli upscale` with the default options (router rank 8, expert rank 128, --svd auto);
  smile-randomized / smile-exact: the same with --svd randomized / exact;
  reference:        every model loaded whole in float32, a full (thin) torch.linalg.svd per task update as given
                    (no transpose), factors kept in memory, saved at the end: the reference algorithm, minimally;
  floor:            read every input byte once (readinto into a reused buffer) from a cold page cache (each file's
                    cached pages dropped first with posix_fadvise DONTNEED) and again warm, + write the output's
                    bytes once with fsync; the factorization's own time comes from the tool's --json summary.
Results: one JSON line per case on stdout and appended to --results. Generated inputs stay under --root (tens of
GB at 8 layers: delete them when done, or pass --clean).

  python benchmarks/upscale_mistral.py --layers 4,8 --cases floor,smile --root /work/bench-tmp/mistral
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SRC = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(SRC / "tests"), str(SRC)]
from peak_rss import PEAK_RSS_RUN, measured_run, print_peak_rss  # noqa: E402
from synthetic_family import PROJECTIONS, mistral_7b_config, weight_files, write_family  # noqa: E402

EXPERTS = 3


def generate(root: Path, layers: int, spectrum: str = "decaying", device: str = "cpu") -> tuple[Path, list[Path]]:
    return write_family(root, mistral_7b_config(layers), EXPERTS, spectrum=spectrum, device=device)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def reference_style(base: Path, experts: list[Path], out: Path, router_rank: int, expert_rank: int) -> None:
    """The reference algorithm, minimally: all models in memory (float32), full SVD per update, save at the end."""
    from safetensors.torch import load_file

    def load(folder):
        return {k: v.float() for f in weight_files(folder) for k, v in load_file(str(f)).items()}

    base_state = load(base)
    expert_states = [load(e) for e in experts]
    result = {}
    for name, w0 in base_state.items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(p) for p in PROJECTIONS):
            result[name] = w0.to(torch.bfloat16)
            continue
        result[module + ".shared_linear.weight"] = w0.to(torch.bfloat16)
        routers, svhs, us = [], [], []
        for state in expert_states:
            u, s, vh = torch.linalg.svd(state[name] - w0, full_matrices=False)
            routers.append(vh[:router_rank])
            svhs.append(s[:expert_rank, None] * vh[:expert_rank])
            us.append(u[:, :expert_rank])
        result[module + ".router.weight"] = torch.cat(routers).contiguous()
        result[module + ".experts_svh"] = torch.cat(svhs).to(torch.bfloat16)
        result[module + ".experts_u"] = torch.cat(us, dim=1).to(torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})


def drop_cached(paths: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of these files (clean pages only; no privileges needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path], buffer: bytearray) -> float:
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - started


def floor(base: Path, experts: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Seconds to read every input byte once (cold page cache, then warm) and to write out_bytes once + fsync."""
    buffer = bytearray(256 * 2**20)
    files = [f for folder in [base, *experts] for f in weight_files(folder)]
    drop_cached(files)
    cold = read_all(files, buffer)
    warm = read_all(files, buffer)
    view = memoryview(buffer)
    started = time.perf_counter()
    with open(scratch, "wb") as f:
        left = out_bytes
        while left > 0:
            n = min(left, len(buffer))
            f.write(view[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - started
    scratch.unlink()
    return {
        "read_cold_s": round(cold, 2),
        "read_warm_s": round(warm, 2),
        "write_s": round(write, 2),
        "input_bytes": sum(f.stat().st_size for f in files),
    }


def timed(argv: list[str], env=None) -> dict:
    """Run argv (a process that prints its own peak RSS, peak_rss.print_peak_rss): wall seconds, peak RSS, stdout."""
    run = measured_run(argv, env=env)
    if run["rc"] != 0:
        raise RuntimeError(f"{argv} failed:\n{run['stderr'][-3000:]}")
    return {"wall_s": run["wall_s"], "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 3), "stdout": run["stdout"]}


def run_case(case: str, layers: int, root: Path, args, out_bytes: int | None) -> dict:
    base, experts = generate(root, layers, args.spectrum)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    common = ["--base", str(base), "--experts", ",".join(map(str, experts)), "--force", "--quiet", "--json"]
    record = {"case": case, "layers": layers, "spectrum": args.spectrum, "date": time.strftime("%Y-%m-%d %H:%M")}
    record["load_before"] = load_avg()
    if case == "smile" or case.startswith("smile-"):
        options = ["--svd", case.removeprefix("smile-")] if case != "smile" else []
        out = root / case
        argv = [sys.executable, "-c", PEAK_RSS_RUN, "upscale", *common, *options, *args.extra.split()]
        argv += ["--out", str(out)]
        run = timed(argv, env)
        summary = json.loads(run.pop("stdout"))
        record.update(run, seconds=summary["seconds"], factorization=summary["factorization"])
        record["output_bytes"] = summary["output_bytes"]
        shutil.rmtree(out, ignore_errors=True)
    elif case == "reference":
        argv = [sys.executable, __file__, "--reference-child", str(base), ",".join(map(str, experts))]
        run = timed([*argv, str(root / case)])
        run.pop("stdout")
        record.update(run)
        shutil.rmtree(root / case, ignore_errors=True)
    elif case == "floor":
        nbytes = out_bytes or int(0.42e9 * layers + 0.6e9)  # about the output size at ranks 8/128, 3 experts
        record.update(floor(base, experts, nbytes, root / "floor.tmp"), output_bytes=nbytes)
    else:
        raise SystemExit(f"unknown case {case!r}")
    record["load_after"] = load_avg()
    return record


def slope(records: list[dict], case: str = "smile") -> dict | None:
    """Per-layer seconds from the smallest and largest layer counts of a case, and the 32-layer extrapolation."""
    runs = sorted((r["layers"], r["wall_s"]) for r in records if r["case"] == case)
    if len(runs) < 2 or runs[0][0] == runs[-1][0]:
        return None
    (l0, t0), (l1, t1) = runs[0], runs[-1]
    per_layer = (t1 - t0) / (l1 - l0)
    return {
        "case": case,
        "per_layer_s": round(per_layer, 2),
        "fixed_s": round(t0 - l0 * per_layer, 2),
        "extrapolated_32_layers_s": round(t0 + (32 - l0) * per_layer, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2", help="comma-separated layer counts, e.g. 4,8")
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-bench"))
    parser.add_argument("--cases", default="smile,floor", help="smile[-randomized|-exact],reference,floor")
    parser.add_argument("--spectrum", default="decaying", help="the experts' updates: lowrank or decaying")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--extra", default="", help="extra smile upscale arguments")
    parser.add_argument("--clean", action="store_true", help="delete each layer count's inputs after")
    parser.add_argument("--reference-child", nargs=3, metavar=("BASE", "EXPERTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        base, experts, out = args.reference_child
        reference_style(Path(base), [Path(e) for e in experts.split(",")], Path(out), 8, 128)
        print_peak_rss()
        return
    records = []
    for layers in [int(n) for n in args.layers.split(",")]:
        root = args.root / f"L{layers}-{args.spectrum}"
        started = time.perf_counter()
        generate(root, layers, args.spectrum)
        print(f"# inputs ready in {time.perf_counter() - started:.0f} s under {root}", file=sys.stderr, flush=True)
        out_bytes = None
        for case in args.cases.split(","):
            record = run_case(case, layers, root, args, out_bytes)
            out_bytes = record.get("output_bytes") if case != "floor" else out_bytes
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if args.clean:
            shutil.rmtree(root, ignore_errors=True)
    for case in dict.fromkeys(r["case"] for r in records if r["case"] != "floor"):
        fit = slope(records, case)
        if fit:
            print(json.dumps(fit), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(fit) + "\n")


if __name__ == "__main__":
    main()
