"""`smile upscale --calibrate` (issue 22 item 3) on the easy and the hard tiny sets, beside faithful, prompt-model and
oracle routing.

    python benchmarks/quality/calibrate.py [--threads 1] [--sets easy-full,easy-lora,hard-full,hard-lora]
        [--prompts 8] [--router-rank 8] [--expert-rank 16] [--report-only]

Easy set: benchmarks/quality's bench preset (caesar, reverse, sort, lookup; each task its own characters; full and
LoRA experts, trained once into --cache). Hard set: routing_hard.py's (flip, roll, swap over one alphabet, told apart
by a cue word at the start or later; mixed prompts of two tasks). Calibration prompts: the first N prompts of each
task's validation split (never trained on, never tested), the hard set's unambiguous ones (3 letters or more) of both
cue formats alternately. Every SMILE model: `smile upscale --router-rank R --expert-rank K --top-k 1 --dtype float32`
with `--routing faithful`, `--routing prompt-model`, or `--calibrate FILE` (routing auto = calibrated); oracle: the
faithful model with every token forced to its task's expert (routing hook). Normalised: accuracy on task t / expert
t's own accuracy, averaged over tasks (greedy, KV cache, batched left padding, the held-out test split). The fit's
leave-one-prompt-out accuracy comes from the --json summary. Writes docs/results/calibrate.json and calibrate.md.
"""

import contextlib
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]

import evaluate as E  # noqa: E402
import report  # noqa: E402
import routing as R  # noqa: E402
import routing_hard as RH  # noqa: E402
import yaml  # noqa: E402

from tiny_experts import models as tiny  # noqa: E402
from tiny_experts import tasks as T  # noqa: E402


def build(base, experts, out: Path, args, *extra) -> dict:
    """smile upscale (in-process) with the benchmark's ranks; the --json summary."""
    from smile_cli.cli import run

    argv = [
        "upscale", "--base", str(base), "--experts", ",".join(str(e) for e in experts), "--out", str(out),
        "--router-rank", str(args.router_rank), "--expert-rank", str(args.expert_rank), "--top-k", "1",
        "--dtype", "float32", "--force", "--json", *map(str, extra),
    ]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run(argv)
    if code != 0:
        raise RuntimeError(f"smile upscale failed (exit {code}): {stderr.getvalue().strip()}")
    return json.loads(stdout.getvalue())


def calibration_prompts(kind: str, names: list[str], n: int) -> dict[str, list[str]]:
    validation, _ = tiny.held_out(names)
    if kind == "easy":
        return {t: [p for p, _ in validation[t][:n]] for t in names}
    out = {}
    for t in names:
        by_format = {f: [p for p, _ in validation[t] if RH.format_of(p) == f and RH._unambiguous(p)] for f in RH.SINGLE}
        mixed = [p for pair in zip(by_format["start"], by_format["later"], strict=False) for p in pair]
        out[t] = mixed[:n]
    return out


def run_set(name: str, args, log) -> dict:
    kind, experts_kind = name.split("-")
    lora = experts_kind == "lora"
    if kind == "easy":
        models = tiny.build_or_load(args.cache, "bench", lora=lora, log=log)
    else:
        models = tiny.build_or_load(args.cache, RH.PRESET, lora=lora, log=log, **RH.SETTINGS)
    names = models["tasks"]
    expert_dirs = [models["experts"][t] for t in names]
    expert_of = {t: i for i, t in enumerate(names)}
    if kind == "easy":
        _, test = tiny.held_out(names)
        sets, max_new = {"single": test}, T.MAX_ANSWER_LEN + 1
    else:
        hard = RH.test_sets(names)
        sets, max_new = {"start": hard["start"], "later": hard["later"], "mixed": hard["mixed"]}, RH.MAX_NEW
    singles = [f for f in sets if f != "mixed"]
    own = {f: {} for f in singles}
    for t, folder in models["experts"].items():
        expert = tiny.load(folder)
        for f in singles:
            own[f][t] = E.accuracy(expert, {t: sets[f][t]}, max_new)[t]
    log(f"[{name}] experts on their own tasks: {own}")
    result = {
        "tasks": names,
        "expert_own": own,
        "modes": {},
        "n": {f: {t: len(v) for t, v in s.items()} for f, s in sets.items()},
    }
    out = args.cache / "smile-tmp" / f"calibrate-{name}"
    runs = [("faithful", ("--routing", "faithful")), ("prompt-model", ("--routing", "prompt-model"))]
    for n in args.prompts:
        prompts = calibration_prompts(kind, names, n)
        file = args.cache / "smile-tmp" / f"calibrate-{name}-{n}.yaml"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(yaml.safe_dump({str(d): prompts[t] for t, d in zip(names, expert_dirs, strict=True)}))
        runs.append((f"calibrated-{n}", ("--calibrate", file)))
        runs.append((f"calibrated-prompt-{n}", ("--calibrate", file, "--routing", "calibrated-prompt")))
    for mode, extra in runs:
        t0 = time.time()
        summary = build(models["base"], expert_dirs, out, args, *extra)
        model = tiny.load(out)
        entry = {"build_seconds": summary["seconds"], "routing": summary["routing"]}
        for f in singles:
            acc = E.accuracy(model, sets[f], max_new)
            entry[f] = {"test": acc, "norm": R.normalised(acc, own[f])}
        if "mixed" in sets:
            entry["mixed"] = E.accuracy(model, sets["mixed"], max_new)
        if "calibration" in summary:
            report_ = summary["calibration"]
            entry["fit"] = {k: report_[k] for k in ("overall", "layers", "methods", "tokens", "prompts_per_expert")}
        if mode == "faithful":
            result["oracle"] = {
                f: {"norm": R.normalised(acc := E.oracle_accuracy(model, sets[f], expert_of), own[f]), "test": acc}
                for f in singles
            }
        result["modes"][mode] = entry
        norms = " ".join(f"{f} {entry[f]['norm']:.3f}" for f in singles)
        mixed = f" mixed {RH.mean(entry['mixed']):.3f}" if "mixed" in entry else ""
        fit = entry.get("fit", {}).get("overall")
        loo = f" (LOO prompts {fit['prompt_accuracy']:.3f}, tokens {fit['token_accuracy']:.3f})" if fit else ""
        log(f"[{name}] {mode}: {norms}{mixed}{loo} ({time.time() - t0:.1f}s)")
    return result


def _pct(x):
    return f"{100 * x:.1f}"


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Calibrated routing: `smile upscale --calibrate` on the tiny task sets (issue 22 item 3)",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results.get('seconds', 0):.0f} s{results.get('load', '')}  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/calibrate.py` (its docstring has the setup); raw numbers in "
        "`calibrate.json`. Normalised exact match (accuracy on task t / expert t's own, averaged over tasks); mixed: "
        "exact match of both joined answers, averaged over the 6 ordered pairs. `calibrated-N`: routers fitted to N "
        "validation prompts per expert. LOO: the fit's leave-one-prompt-out accuracy (prompts: majority over every "
        "module's token votes; tokens: mean over modules).",
        "",
    ]
    for name, res in results["sets"].items():
        singles = [f for f in res["expert_own"]]
        hard = "mixed" in next(iter(res["modes"].values()))
        lines += [f"## {name}", "", "Experts on their own task (%): " + "; ".join(
            f"{f}: " + ", ".join(f"{t} {_pct(v)}" for t, v in res["expert_own"][f].items()) for f in singles
        ), ""]  # fmt: skip
        header = "| routing | " + " | ".join(f"{f} (norm.)" for f in singles) + (" | mixed (exact) |" if hard else " |")
        header += (
            " LOO prompts | LOO tokens | fit methods | "
            + " | ".join(f"{f} {t}" for f in singles for t in res["tasks"])
            + " |"
        )
        lines += [
            header,
            "|---|" + "---:|" * (len(singles) + hard + 2) + "---|" + "---:|" * (len(singles) * len(res["tasks"])),
        ]
        for mode, e in res["modes"].items():
            fit = e.get("fit")
            cells = [_pct(e[f]["norm"]) for f in singles] + ([_pct(RH.mean(e["mixed"]))] if hard else [])
            cells += (
                [_pct(fit["overall"]["prompt_accuracy"]), _pct(fit["overall"]["token_accuracy"])] if fit else ["", ""]
            )
            cells.append(", ".join(f"{m} x{c}" for m, c in fit["methods"].items()) if fit else "")
            cells += [_pct(e[f]["test"][t]) for f in singles for t in res["tasks"]]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        o = res.get("oracle")
        if o:
            cells = [_pct(o[f]["norm"]) for f in singles] + (["-"] if hard else []) + ["", "", ""]
            cells += [_pct(o[f]["test"][t]) for f in singles for t in res["tasks"]]
            lines.append("| oracle (per token, task's expert) | " + " | ".join(cells) + " |")
        for mode, e in res["modes"].items():
            if "fit" in e:
                layers = "; ".join(
                    f"layer {k}: {_pct(g['prompt_accuracy'])} / {_pct(g['token_accuracy'])}"
                    for k, g in e["fit"]["layers"].items()
                )
                lines += ["", f"{mode} LOO per layer (prompts by majority over the layer's modules / tokens): {layers}"]
        lines.append("")
    discussion = HERE / "calibrate_discussion.md"
    if discussion.exists():
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    (out / "calibrate.md").write_text("\n".join(lines) + "\n")


def main():
    ap = report.parser(__doc__)
    ap.add_argument("--sets", default="easy-full,easy-lora,hard-full,hard-lora")
    ap.add_argument("--prompts", default="8", help="calibration prompts per expert, comma-separated")
    ap.add_argument("--router-rank", type=int, default=8)
    ap.add_argument("--expert-rank", default="16")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.prompts = [int(n) for n in args.prompts.split(",")]
    path = args.out / "calibrate.json"
    if args.report_only:
        write_report(json.loads(path.read_text()), args.out)
        return
    log, elapsed = report.start(args.threads)
    results = json.loads(path.read_text()) if path.exists() else {"sets": {}}
    results.update(report.provenance("benchmarks/quality/calibrate.py"))
    for name in args.sets.split(","):
        results["sets"][name] = run_set(name, args, log)
        results["seconds"] = elapsed()
        path.write_text(json.dumps(results, indent=1))
        write_report(results, args.out)
    log(f"done in {elapsed()}s -> {args.out / 'calibrate.md'}")


if __name__ == "__main__":
    main()
