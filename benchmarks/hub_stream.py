"""Upscale straight from a (local) Hub: streamed inputs against download-then-upscale, at capped bandwidths.

Writes a Mistral-7B-shaped family (bfloat16; hidden 4096, intermediate 14336, 8 kv heads, vocab 32000; --layers
decoder layers, --experts fine-tunes; tests/synthetic_family.py) under --root, serves it from the Hub look-alike of the
tests (tests/hub_server.py) on 127.0.0.1 with the bandwidth capped, and runs `smile upscale` in a subprocess for each
rate and mode with an empty HF_HOME:
  stream:   --inputs stream (range requests, nothing of the inputs on disk, read-ahead overlapping the network);
  download: --inputs download (every weight file downloaded into the cache, then the upscale reads it there);
  local:    the same upscale from the family's local folders (no server), for the overlap target.
Measured: wall time, bytes the server sent, peak RSS of the run (its own VmHWM: tests/peak_rss.py PEAK_RSS_RUN),
peak disk (HF_HOME + output + staging, sampled every 0.2 s), the 1-minute load before and after. Modes run in the
order given, per rate, so a rate's stream and local runs are interleaved in time. Overlap: a streamed run
overlaps the transfer with the computation when its wall time is close to max(transfer time = bytes sent / rate,
the local run's wall time), not their sum (`stream_over_max`). One JSON line per run on stdout; --results: all.

  python benchmarks/hub_stream.py --layers 4 --rates 50MB,500MB --modes local,stream,download
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SRC / "tests"))


from hub_server import HubServer  # noqa: E402
from peak_rss import PEAK_RSS_RUN, measured_run  # noqa: E402
from smile_cli.options import parse_size  # noqa: E402
from synthetic_family import mistral_7b_config, write_family  # noqa: E402


def disk_usage(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        for folder, _, files in os.walk(root):
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    try:
                        total += path.stat().st_size
                    except OSError:
                        pass
    return total


def run_case(server: HubServer, work: Path, mode: str, repos: list[str], extra: list[str], folders: list[Path]) -> dict:
    hf_home, out = work / "hf", work / "output" / "out"
    for path in (hf_home, out, out.parent / f".{out.name}.smile-staging"):
        shutil.rmtree(path, ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
    }
    if mode == "local":
        argv = ["upscale", "--base", str(folders[0]), "--experts", ",".join(map(str, folders[1:])), "--out", str(out)]
    else:
        argv = ["upscale", "--base", repos[0], "--experts", ",".join(repos[1:]), "--inputs", mode, "--out", str(out)]
    load_before = round(os.getloadavg()[0], 2)
    server.reset_counts()
    peak_disk, done = 0, threading.Event()

    def sample():
        nonlocal peak_disk
        while not done.is_set():
            peak_disk = max(peak_disk, disk_usage([hf_home, out.parent]))  # the output and its staging folder
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = measured_run([sys.executable, "-c", PEAK_RSS_RUN, *argv, *extra, "--json", "-q"], env=env)
    done.set()
    sampler.join()
    if run["rc"] != 0:
        raise SystemExit(f"{mode} failed ({run['rc']}): {run['stderr'][-2000:]}")
    summary = json.loads(run["stdout"])
    record = {
        "mode": mode,
        "rate_bytes_per_s": server.rate,
        "wall_s": round(run["wall_s"], 1),
        "upscale_s": summary["seconds"],
        "sent_bytes": server.sent_total(".safetensors"),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_disk_bytes": peak_disk,
        "output_bytes": summary["output_bytes"],
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
    }
    if mode != "local":
        record["transfer_s"] = round(record["sent_bytes"] / server.rate, 1)
    shutil.rmtree(hf_home, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-hub-bench"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rates", default="100MB,1GB", help="bandwidth caps, bytes per second")
    parser.add_argument("--modes", default="stream,download")
    parser.add_argument("--max-file-bytes", default="1GB", help="input shard size (Hub models come in shards)")
    parser.add_argument("--extra", default="", help="more `smile upscale` flags, space-separated")
    parser.add_argument("--family", type=Path, default=None, help="an existing family folder (base/, expert0/, ...)")
    parser.add_argument("--results", type=Path, default=SRC / "docs" / "results" / "hub_stream.json")
    args = parser.parse_args()

    if args.family:
        base, experts = args.family / "base", [args.family / f"expert{i}" for i in range(args.experts)]
    else:
        family = args.root / f"mistral-{args.layers}l-{args.experts}e"
        config = mistral_7b_config(args.layers)
        base, experts = write_family(family, config, args.experts, max_file_bytes=parse_size(args.max_file_bytes))
    records = []
    for rate in [parse_size(r) for r in args.rates.split(",")]:
        with HubServer(rate=rate) as server:
            repos = [f"bench/{folder.name}" for folder in [base, *experts]]
            for repo, folder in zip(repos, [base, *experts], strict=True):
                server.push(repo, folder)
            rate_records = []
            for mode in args.modes.split(","):
                record = run_case(server, args.root / "work", mode, repos, args.extra.split(), [base, *experts])
                record.update(layers=args.layers, experts=args.experts)
                print(json.dumps(record), flush=True)
                rate_records.append(record)
            local = [r for r in rate_records if r["mode"] == "local"]
            for record in rate_records:
                if record["mode"] == "stream" and local:
                    bound = max(record["transfer_s"], local[0]["wall_s"])
                    record["stream_over_max"] = round(record["wall_s"] / bound, 3)
                    print(json.dumps({"rate": server.rate, "stream_over_max": record["stream_over_max"]}), flush=True)
            records += rate_records
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
