"""The measuring half of benchmarks/gpu_check.sh (which sets up Python and runs the CUDA tests first).

On Mistral-7B-shaped inputs (base + 3 experts, bf16, the shared generator tests/synthetic_family.py, `decaying`
updates), as many layers as --layers says (auto: as many as the disk allows, at most 12, at least 4), measures:
  machine:   Python, torch, CUDA, the GPU, cores, memory, free disk, the load average;
  floor:     reading every input byte once from a cold page cache (each file's pages dropped first with
             posix_fadvise, no privileges needed) and warm, writing the output's bytes once + fsync, and (CUDA)
             pinned host-to-device copies;
  upscale:   `smile upscale --device DEVICE --json` with the default options, page cache warm, then again
             cold (pages dropped first), then `--device cpu` warm on the same inputs (for the ratio): wall time,
             peak RSS (the run's own VmHWM), per-stage times of the --json summary (factorize, check), outputs.
Every stage gets what is left of the deadline (SMILE_GPU_CHECK_DEADLINE, epoch seconds; else now + --budget-s)
and is recorded as skipped when too little is left. Writes OUT/gpu_check.json and OUT/summary.txt.

  python benchmarks/gpu_check.py --out RESULTS --device cuda [--layers auto|N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(SRC / "benchmarks"), str(SRC / "tests"), str(SRC)]

import torch  # noqa: E402

from peak_rss import PEAK_RSS_RUN, measured_run  # noqa: E402
from synthetic_family import family_bytes, mistral_7b_config, weight_files  # noqa: E402
from upscale_mistral import EXPERTS, drop_cached, floor, generate, load_avg  # noqa: E402

OUTPUT_BYTES_PER_LAYER = 0.42e9  # measured: ranks 8/128, 3 experts, Mistral-7B shapes, bf16
MIN_LAYERS, MAX_AUTO_LAYERS = 4, 12


def machine(device: str, work: Path) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "disk_free_bytes": shutil.disk_usage(work).free,
        "load_avg": load_avg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    info["device"] = device
    return info


def choose_layers(requested: str, work: Path) -> int:
    """The layer count: as requested, or the most (up to MAX_AUTO_LAYERS) whose inputs and output fit the disk
    with 5 GB to spare."""
    if requested != "auto":
        return int(requested)
    free = shutil.disk_usage(work).free
    layers = MIN_LAYERS
    for n in range(MIN_LAYERS, MAX_AUTO_LAYERS + 1):
        if family_bytes(mistral_7b_config(n), EXPERTS) + 2 * OUTPUT_BYTES_PER_LAYER * n + 5e9 < free:
            layers = n
    return layers


def h2d_copy(total_bytes: int = 4 * 2**30, chunk: int = 256 * 2**20) -> dict:
    """Pinned host -> device copy rate (what --device cuda does with every weight)."""
    host = torch.empty(chunk, dtype=torch.uint8).pin_memory()
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(total_bytes // chunk):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"bytes": total_bytes, "seconds": round(seconds, 3), "gb_per_s": round(total_bytes / seconds / 1e9, 2)}


def upscale(base: Path, experts: list[Path], out: Path, device: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    argv = [sys.executable, "-c", PEAK_RSS_RUN, "upscale", "--base", str(base), "--experts"]
    argv += [",".join(map(str, experts)), "--out", str(out), "--device", device, "--force", "--quiet", "--json"]
    record = {"device": device, "load_before": load_avg()}
    try:
        run = measured_run(argv, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "status": f"timed out after {timeout:.0f} s"}
    record["load_after"] = load_avg()
    if run["rc"] != 0:
        return {**record, "status": f"failed (exit {run['rc']})", "stderr": run["stderr"][-3000:]}
    summary = json.loads(run["stdout"])
    factorization = summary["factorization"]
    record.update(
        status="ok",
        wall_s=run["wall_s"],
        peak_rss_bytes=run["peak_rss_bytes"],
        upscale_s=summary["seconds"],
        stages_s=factorization.get("seconds"),
        methods=factorization.get("methods"),
        device_reported=factorization.get("device"),
        max_error_ratio=factorization.get("max_error_ratio"),
        min_router_cosine=factorization.get("min_router_cosine"),
        output_bytes=summary["output_bytes"],
    )
    return record


def summary_text(result: dict) -> str:
    m, lines = result["machine"], []
    lines.append(f"smile gpu_check {m['date_utc']} UTC: device {m['device']}, {m.get('gpu', 'no GPU')}, ")
    lines[-1] += f"{m['cpu_count']} cores, torch {m['torch']} (CUDA {m.get('cuda')}), load {m['load_avg']}"
    lines.append(f"tests: {result.get('tests', 'not run')}")
    lines.append(
        f"inputs: Mistral-7B shapes, {result['layers']} layers, base + {EXPERTS} experts, "
        f"{result['input_bytes'] / 1e9:.2f} GB (generated in {result['generate_s']:.0f} s)"
    )
    fl = result.get("floor") or {}
    if fl:
        lines.append(
            f"floor: read cold {fl['read_cold_s']} s, warm {fl['read_warm_s']} s; write {fl['write_s']} s "
            f"({fl['output_bytes'] / 1e9:.2f} GB + fsync)"
        )
    if result.get("h2d"):
        lines.append(f"host-to-device (pinned): {result['h2d']['gb_per_s']} GB/s")
    for name, run in result["runs"].items():
        if run.get("status") != "ok":
            lines.append(f"{name}: {run.get('status')}")
            continue
        stages = run["stages_s"] or {}
        lines.append(
            f"{name}: wall {run['wall_s']} s (factorize {stages.get('factorize')} s, check {stages.get('check')} s), "
            f"peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB, max error ratio {run['max_error_ratio']}"
        )
    for key, value in result.get("ratios", {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", default="auto")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smile-gpu-check"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="without SMILE_GPU_CHECK_DEADLINE")
    parser.add_argument("--cases", default="device-warm,device-cold,cpu", help="upscale runs, in this order")
    parser.add_argument("--tests", default=None, help="the CUDA tests' outcome, for the summary")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    args = parser.parse_args()
    deadline = float(os.environ.get("SMILE_GPU_CHECK_DEADLINE", time.time() + args.budget_s))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(args.device, args.work), "tests": args.tests}
    layers = choose_layers(args.layers, args.work)
    started = time.perf_counter()
    where = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers drawn on the GPU: seconds, not minutes
    base, experts = generate(args.work / f"L{layers}", layers, device=where)
    files = [f for folder in [base, *experts] for f in weight_files(folder)]
    result.update(layers=layers, generate_s=round(time.perf_counter() - started, 1))
    result["input_bytes"] = sum(f.stat().st_size for f in files)
    result["runs"] = {}

    def save():
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "summary.txt").write_text(summary_text(result))

    out_bytes = int(OUTPUT_BYTES_PER_LAYER * layers + 0.6e9)
    for case in args.cases.split(","):
        left = deadline - time.time() - 20  # the floor and the files still to write
        if left < 30:
            result["runs"][case] = {"status": f"skipped: {left + 20:.0f} s left before the deadline"}
            continue
        device = "cpu" if case == "cpu" else args.device
        if case == "device-cold":
            drop_cached(files)
        if case == "cpu" and args.device == "cpu":
            result["runs"][case] = {"status": "skipped: the device is the CPU"}
            continue
        run = upscale(base, experts, args.work / "out", device, left)
        result["runs"][case] = run
        out_bytes = run.get("output_bytes") or out_bytes
        shutil.rmtree(args.work / "out", ignore_errors=True)
        save()
    result["floor"] = {**floor(base, experts, out_bytes, args.work / "floor.tmp"), "output_bytes": out_bytes}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        result["h2d"] = h2d_copy()
    runs, fl = result["runs"], result["floor"]
    ratios = {}
    if runs.get("cpu", {}).get("status") == "ok" and runs.get("device-warm", {}).get("status") == "ok":
        ratios["cpu_over_device_wall"] = round(runs["cpu"]["wall_s"] / runs["device-warm"]["wall_s"], 2)
    for case in ("device-warm", "device-cold"):
        if runs.get(case, {}).get("status") == "ok":
            read = fl["read_warm_s"] if case == "device-warm" else fl["read_cold_s"]
            ratios[f"{case}_over_floor"] = round(runs[case]["wall_s"] / (read + fl["write_s"]), 2)
    result["ratios"] = ratios
    save()
    if not args.keep:
        shutil.rmtree(args.work / f"L{layers}", ignore_errors=True)
    print(summary_text(result), end="")


if __name__ == "__main__":
    main()
