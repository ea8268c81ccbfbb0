"""Peak RSS and wall time of `smile upscale` against the number of decoder layers, at fixed width.

    python benchmarks/memory_vs_layers.py [--hidden 1024 --intermediate 2816 --layers 2,8,32 --experts 3 --svd auto]

Each run is a separate process measured by /usr/bin/time -v. Results print as a markdown table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic_family import mistral_7b_config, write_family  # noqa: E402


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    return seconds, rss_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", default="2,8,32")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--router-rank", default="8")
    parser.add_argument("--expert-rank", default="128")
    parser.add_argument("--svd", default="auto", help="smile upscale --svd: exact|randomized|auto")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "smile-bench-layers")
    args = parser.parse_args()
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        config = mistral_7b_config(
            layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_attention_heads=max(1, args.hidden // 128),
            num_key_value_heads=max(1, args.hidden // 512),
        )
        root = args.workdir / f"h{args.hidden}-l{layers}-t{args.experts}"
        base, experts = write_family(root, config, args.experts)
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        command = [
            "smile",
            "upscale",
            "--base",
            str(base),
            "--experts",
            ",".join(map(str, experts)),
            "--out",
            str(out),
            "--router-rank",
            args.router_rank,
            "--expert-rank",
            args.expert_rank,
            "-q",
        ]
        seconds, rss = measure(command)
        inputs_gb = sum(f.stat().st_size for f in root.rglob("*.safetensors") if out not in f.parents) / 1e9
        rows.append((layers, inputs_gb, seconds, rss))
        shutil.rmtree(out, ignore_errors=True)
        print(f"layers={layers}: inputs {inputs_gb:.2f} GB, {seconds:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
    print("\n| layers | inputs (GB) | wall (s) | s / layer | peak RSS (MiB) |\n|---|---|---|---|---|")
    for layers, gb, seconds, rss in rows:
        print(f"| {layers} | {gb:.2f} | {seconds:.1f} | {seconds / layers:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
