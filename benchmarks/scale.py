"""Every smile command at near-real scale: a Mistral-7B-shaped family (hidden 4096, intermediate 14336, vocab 32000,
bf16, base + 3 experts from tests/synthetic_family.py) at several layer counts, each command a subprocess
(wall time, peak RSS: the run's own VmHWM, tests/peak_rss.py measured_run), so that memory against depth shows
and per-layer times extrapolate to 32.

    python benchmarks/scale.py --layers 2,6 [--commands inspect,dry-run,upscale,exact,export-lora,export-dense,
        verify,route] [--root /tmp/smile-scale] [--results scale.jsonl] [--keep | --clean]

First it checks the free disk space under --root and says how many layers of this family (inputs + output + the
dense export) would fit. Commands (their outputs are reused by the later ones, so keep this order):
  inspect       smile inspect BASE --experts ... --json (spectra, overlaps; --budget 1.05x: the rank allocation)
  dry-run       smile upscale ... --dry-run --json
  upscale       smile upscale ... (defaults: router rank 8, expert rank 128, --svd auto) -> OUT
  exact         smile upscale ... --svd exact on layer 0's q_proj and up_proj (full SVDs; the largest shape)
  verify        smile verify OUT --json (the whole-model pass runs when it fits half the available memory)
  verify-layers smile verify OUT --json --max-memory 1GB (every check but the whole-model pass, in fixed memory)
  export-lora   smile export OUT OUT-lora --expert 0 --as lora
  export-dense  smile export OUT OUT-dense --expert 0 --as dense
  route         smile route OUT --prompt '...' --json (refuses, exit 2, when the model does not fit in memory)
One JSON line per (layers, command) on stdout and appended to --results; a markdown table at the end.
Generated folders are deleted at the end unless --keep (they are tens of GB); --clean only deletes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(SRC / "tests"), str(SRC)]

from peak_rss import PEAK_RSS_RUN, measured_run  # noqa: E402
from synthetic_family import mistral_7b_config, shapes, write_family  # noqa: E402

EXPERTS = 3
ALL_COMMANDS = "inspect,dry-run,upscale,exact,verify,verify-layers,export-lora,export-dense,route"
PROMPT = "The capital of France is"
# full SVDs cost minutes per matrix kind on 2 cores: one square and one of the largest (14336 x 4096) projections
EXACT_TARGETS = "model.layers.0.self_attn.q_proj,model.layers.0.mlp.up_proj"


def model_bytes(layers: int) -> int:
    """Bytes of one bf16 checkpoint of this family."""
    return sum(math.prod(shape) * 2 for shape in shapes(mistral_7b_config(layers)).values())


def char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer in the base folder (write_family writes none), so that upscale copies it and
    route can tokenize a prompt."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(c): c for c in range(32, 127)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def timed(argv: list[str]) -> dict:
    """Run a `python -c PEAK_RSS_RUN ...` command: exit code, wall seconds, peak RSS (GB, the run's own VmHWM),
    stdout, last stderr line."""
    run = measured_run(argv, env=dict(os.environ, PYTHONPATH=str(SRC)))
    own = [line for line in run["stderr"].splitlines() if line.strip()]
    return {
        "rc": run["rc"],
        "wall_s": run["wall_s"],
        "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 3) if run["peak_rss_bytes"] else None,
        "stdout": run["stdout"],
        "stderr_tail": own[-1] if own else "",
    }


def fits(root: Path, sample_layers: int, out_bytes: int | None) -> dict:
    """Free disk under root and how many layers of inputs + output + dense export would fit in it."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    fixed, per_layer = model_bytes(0), model_bytes(1) - model_bytes(0)
    # output at the default ranks: about 1.17x a base layer per layer (measured by the dry run when given)
    out_per_layer = (out_bytes - fixed) / sample_layers if out_bytes else 1.17 * per_layer
    need_fixed = (EXPERTS + 1) * fixed + fixed + fixed  # inputs, output, dense export
    need_layer = (EXPERTS + 1) * per_layer + out_per_layer + per_layer
    reserve = 10 * 10**9  # left for the other users of the disk
    layers = max(0, int((free - reserve - need_fixed) // need_layer))
    return {
        "free_gb": round(free / 1e9, 1),
        "inputs_32_layers_gb": round((EXPERTS + 1) * model_bytes(32) / 1e9, 1),
        "output_32_layers_gb": round((fixed + 32 * out_per_layer) / 1e9, 1),
        "layers_that_fit": min(layers, 32),
    }


def run_commands(root: Path, layers: int, commands: list[str], results: Path | None) -> list[dict]:
    started = time.perf_counter()
    base, experts = write_family(root / f"L{layers}", mistral_7b_config(layers), EXPERTS)
    char_tokenizer(base)
    print(f"# L{layers}: inputs ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    out = root / f"L{layers}" / "out"
    smile = [sys.executable, "-c", PEAK_RSS_RUN]  # the CLI, printing its own peak RSS
    inputs = ["--base", str(base), "--experts", ",".join(map(str, experts))]
    argvs = {
        "inspect": [*smile, "inspect", str(base), "--experts", ",".join(map(str, experts)), "--budget", "1.05x"],
        "dry-run": [*smile, "upscale", *inputs, "--dry-run", "--json"],
        "upscale": [*smile, "upscale", *inputs, "--out", str(out), "--force", "--quiet", "--json"],
        "exact": [*smile, "upscale", *inputs, "--out", str(out) + "-exact", "--force", "--quiet", "--json"]
        + ["--svd", "exact", "--target", EXACT_TARGETS],
        "verify": [*smile, "verify", str(out), "--json"],
        "verify-layers": [*smile, "verify", str(out), "--json", "--max-memory", "1GB"],
        "export-lora": [*smile, "export", str(out), str(out) + "-lora", "--expert", "0", "--as", "lora", "--force"],
        "export-dense": [*smile, "export", str(out), str(out) + "-dense", "--expert", "0", "--as", "dense", "--force"],
        "route": [*smile, "route", str(out), "--prompt", PROMPT, "--json"],
    }
    argvs["inspect"].append("--json")
    rows = []
    for command in commands:
        record = {"layers": layers, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        run = timed(argvs[command])
        stdout = run.pop("stdout")
        record.update(run)
        if command in ("upscale", "exact") and run["rc"] == 0:
            summary = json.loads(stdout)
            record["output_bytes"] = summary["output_bytes"]
            record["factorization_s"] = summary.get("factorization", {}).get("seconds")
        if command == "dry-run" and run["rc"] == 0:
            record["output_bytes"] = json.loads(stdout)["output_bytes"]
        if command.startswith("verify") and stdout.strip().startswith("{"):
            report = json.loads(stdout)
            record["ok"] = report["ok"]
            record["checks"] = report["checks"]
            record["skipped"] = report["skipped"]
        print(json.dumps(record), flush=True)
        if results:
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
        rows.append(record)
    return rows


def table(rows: list[dict]) -> str:
    """Per command: wall and peak RSS at each layer count, seconds per layer, extrapolated to 32 layers."""
    counts = sorted({r["layers"] for r in rows})
    lines = [
        "| command | "
        + " | ".join(f"{n} layers: wall s / peak RSS GB" for n in counts)
        + " | s per layer | 32 layers (s) |",
        "|---|" + "---|" * (len(counts) + 2),
    ]
    for command in dict.fromkeys(r["command"] for r in rows):
        by = {r["layers"]: r for r in rows if r["command"] == command}
        cells = [
            f"{by[n]['wall_s']} / {by[n]['peak_rss_gb']}" + ("" if by[n]["rc"] == 0 else f" (exit {by[n]['rc']})")
            if n in by
            else "-"
            for n in counts
        ]
        ok = [n for n in counts if n in by and by[n]["rc"] == 0]
        per_layer = extrapolated = "-"
        if len(ok) >= 2:
            lo, hi = ok[0], ok[-1]
            slope = (by[hi]["wall_s"] - by[lo]["wall_s"]) / (hi - lo)
            per_layer = f"{slope:.1f}"
            extrapolated = f"{by[lo]['wall_s'] + slope * (32 - lo):.0f}"
        lines.append(f"| {command} | " + " | ".join(cells) + f" | {per_layer} | {extrapolated} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,6", help="comma-separated layer counts, run one after the other")
    parser.add_argument("--commands", default=ALL_COMMANDS)
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-scale"))
    parser.add_argument("--results", type=Path, default=None, help="append one JSON line per run here")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders (for a later --commands)")
    parser.add_argument("--clean", action="store_true", help="only delete the generated folders")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(args.root, ignore_errors=True)
        return
    counts = [int(n) for n in args.layers.split(",")]
    commands = [c for c in args.commands.split(",") if c]
    unknown = set(commands) - set(ALL_COMMANDS.split(","))
    if unknown:
        parser.error(f"unknown commands: {', '.join(sorted(unknown))}")
    disk = fits(args.root, 1, None)
    print(json.dumps({"disk": disk}), file=sys.stderr, flush=True)
    need = sum((EXPERTS + 3) * model_bytes(n) for n in counts)
    if need > disk["free_gb"] * 1e9 - 10 * 10**9:
        raise SystemExit(f"not enough free disk under {args.root}: about {need / 1e9:.0f} GB needed")
    rows = []
    try:
        for layers in counts:
            rows += run_commands(args.root, layers, commands, args.results)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(table(rows))


if __name__ == "__main__":
    main()
