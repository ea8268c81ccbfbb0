"""Wall time of `smile upscale` with default options, two source trees interleaved (ABAB...), on
benchmarks/upscale_mistral.py's Mistral-7B-shaped inputs (base + 3 experts, --layers deep).

Each run is a subprocess `python -m smile_cli upscale --base ... --experts ... --out ... --force --quiet --json`
(through RUNNER, which adds the peak RSS line) with PYTHONPATH set to the tree; wall time and peak RSS (the
process's VmHWM) are measured as upscale_mistral.timed does, the factorization and quality check seconds come
from the --json summary, and the 1-minute load average is read before each run (the machine may be shared:
interleaving keeps the ratio fair). Prints one JSON line per run, then medians and after/before ratios.

  python benchmarks/upscale_ab.py --before /tmp/r11-before --after . --layers 2 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from peak_rss import PEAK_RSS_MARK  # noqa: E402
from upscale_mistral import generate, timed  # noqa: E402

# `python -m smile_cli` that prints its own peak RSS as peak_rss.print_peak_rss does, whatever the tree's version
# (an earlier tree has no smile_cli.memory).
RUNNER = f"""import runpy, sys
sys.argv[0] = "smile_cli"
try:
    runpy.run_module("smile_cli", run_name="__main__", alter_sys=True)
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("{PEAK_RSS_MARK}", int(hwm.split()[1]) * 1024, file=sys.stderr, flush=True)
"""


def run(tree: Path, base: Path, experts: list[Path], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    argv = [sys.executable, "-c", RUNNER, "upscale", "--base", str(base), "--experts", ",".join(map(str, experts))]
    record = {"load_1min": os.getloadavg()[0]}
    result = timed([*argv, "--out", str(out), "--force", "--quiet", "--json"], env)
    seconds = json.loads(result.pop("stdout"))["factorization"]["seconds"]
    record.update(result, factorize_s=seconds["factorize"], check_s=seconds["check"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the earlier release")
    parser.add_argument("--after", type=Path, required=True, help="source tree of the later release")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-bench"))
    parser.add_argument("--results", type=Path, help="write the runs and the summary here (JSON)")
    args = parser.parse_args()
    root = args.root / f"L{args.layers}"
    base, experts = generate(root, args.layers)
    for folder in [base, *experts]:  # warm the page cache for every run alike
        with open(folder / "model.safetensors", "rb") as f:
            while f.read(1 << 26):
                pass
    runs = {"before": [], "after": []}
    for pair in range(args.pairs):
        for name in ("before", "after"):
            record = run(getattr(args, name), base, experts, root / "out")
            record.update(tree=name, pair=pair)
            print(json.dumps(record), flush=True)
            runs[name].append(record)
    summary = {"layers": args.layers, "pairs": args.pairs}
    for field in ("wall_s", "factorize_s", "check_s", "peak_rss_gb"):
        medians = {name: statistics.median(r[field] for r in records) for name, records in runs.items()}
        summary[field] = dict(medians, ratio=round(medians["after"] / medians["before"], 3))
    summary["load_1min"] = [r["load_1min"] for r in runs["before"] + runs["after"]]
    print(json.dumps(summary), flush=True)
    if args.results:
        args.results.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
