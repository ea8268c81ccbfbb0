"""Task-retention benchmark: base vs experts vs merging baselines vs SMILE, on a tiny trained Llama.

    python benchmarks/quality/run.py                # full benchmark -> docs/results/quality.md (+ .json, PNGs)
    python benchmarks/quality/run.py --preset demo  # the small demo models (faster)

Models are cached under benchmarks/quality/.cache (git-ignored) and reused on reruns; SMILE models are
rebuilt with `smile upscale` every run (that is what is measured).
"""

import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]  # tiny_experts: scripts/

import diagnostics  # noqa: E402
import evaluate as E  # noqa: E402
import report  # noqa: E402
import smile_grid  # noqa: E402

from tiny_experts import merging  # noqa: E402
from tiny_experts import models as tiny  # noqa: E402

ROUTER_RANKS = [1, 2, 4, 8, 16]
EXPERT_RANKS = [4, 8, 16, 32, "full"]
TOP_KS = [1, 2]
TA_SCALES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
TIES_SCALES = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0]
TIES_DENSITY = 0.2
FAITHFUL = ("--routing", "faithful")  # the grid measures the paper's router (the default picks prompt-model here)
PARAM_BUDGET = 1.5  # headline: best SMILE (chosen on validation) with at most this many x base params


def normalised(acc: dict, expert_acc: dict) -> float:
    """Mean over tasks of acc[t] / (expert t's own accuracy on t); tasks whose expert scores 0 are skipped."""
    ratios = [acc[t] / expert_acc[t] for t in acc if expert_acc[t] > 0]
    return sum(ratios) / max(1, len(ratios))


def run_set(kind: str, preset: str, cache: Path, log) -> dict:
    models = tiny.build_or_load(cache, preset, lora=(kind == "lora"), log=log)
    task_names = models["tasks"]
    expert_of = {t: i for i, t in enumerate(task_names)}
    val, test = tiny.held_out(task_names)

    def scores(model):
        return E.accuracy(model, val), E.accuracy(model, test)

    res = {"tasks": task_names, "rows": {}, "grid": [], "oracle": {}, "train_seconds": models["train_seconds"]}
    base = tiny.load(models["base"])
    base_params = E.count_params(base)
    res["base_params"] = base_params
    base_val, base_test = scores(base)
    experts_val, experts_test = {}, {}
    expert_rows = {}
    for t, folder in models["experts"].items():
        v, te = scores(tiny.load(folder))
        expert_rows[t] = (v, te)
        experts_val[t], experts_test[t] = v[t], te[t]
    res["expert_own_test"] = experts_test

    def row(name, test_acc, params, **extra):
        res["rows"][name] = dict(test=test_acc, norm=normalised(test_acc, experts_test), params=params, **extra)

    row("base", base_test, base_params)
    for t, (_, te) in expert_rows.items():
        row(f"expert:{t}", te, base_params)
    log(f"[{kind}] expert own-task test accuracy: {experts_test}")

    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    expert_sds = [tiny.load(f).state_dict() for f in models["experts"].values()]

    def merged_scores(sd):
        base.load_state_dict(sd)
        return scores(base)

    _, te = merged_scores(merging.simple_average(base_sd, expert_sds))
    row("simple average", te, base_params)

    def tune(name, make, scales):
        best = None
        for s in scales:
            v, te = merged_scores(make(s))
            nv = normalised(v, experts_val)
            if best is None or nv > best[0]:
                best = (nv, s, te)
        row(name, best[2], base_params, scale=best[1])
        log(f"[{kind}] {name}: scale {best[1]} (val norm {best[0]:.3f}) test {best[2]}")

    tune("task arithmetic", lambda s: merging.task_arithmetic(base_sd, expert_sds, s), TA_SCALES)
    ties_upd = merging.ties_update(base_sd, expert_sds, TIES_DENSITY)
    tune("TIES", lambda s: merging.ties(base_sd, expert_sds, s, update=ties_upd), TIES_SCALES)
    base.load_state_dict(base_sd)

    smile_dir = cache / "smile-tmp" / kind
    routing_examples = {t: test[t][:60] for t in task_names}
    for k in EXPERT_RANKS:
        for r in ROUTER_RANKS:
            for top in TOP_KS:
                t0 = time.time()
                experts = list(models["experts"].values())
                out = smile_grid.upscale(models["base"], experts, smile_dir, r, k, top, FAITHFUL)
                model = tiny.load(out)
                v, te = scores(model)
                entry = dict(
                    router_rank=r,
                    expert_rank=k,
                    top_k=top,
                    params=E.count_params(model),
                    test=te,
                    norm=normalised(te, experts_test),
                    val_norm=normalised(v, experts_val),
                    routing=E.routing_accuracy(model, routing_examples, expert_of),
                )
                res["grid"].append(entry)
                if k not in res["oracle"]:  # oracle routing ignores the router: once per expert rank
                    oracle = E.oracle_accuracy(model, test, expert_of)
                    res["oracle"][str(k)] = dict(test=oracle, norm=normalised(oracle, experts_test))
                log(
                    f"[{kind}] SMILE r={r} k={k} top{top}: norm {entry['norm']:.3f} "
                    f"params x{entry['params'] / base_params:.2f} ({time.time() - t0:.1f}s)"
                )

    within = [g for g in res["grid"] if g["params"] <= PARAM_BUDGET * base_params] or res["grid"]
    best = max(within, key=lambda g: (g["val_norm"], -g["params"]))
    res["headline"] = best
    out = smile_grid.upscale(
        models["base"],
        list(models["experts"].values()),
        smile_dir,
        best["router_rank"],
        best["expert_rank"],
        best["top_k"],
        FAITHFUL,
    )
    model = tiny.load(out)
    best["routing_by_projection"] = E.routing_accuracy(model, routing_examples, expert_of, by="projection")
    best["routing_confusion"] = E.routing_accuracy(model, routing_examples, expert_of, by="confusion")
    shutil.rmtree(smile_dir, ignore_errors=True)
    res["diagnostics"] = diagnostics.update_diagnostics(base_sd, expert_sds, router_rank=best["router_rank"])
    row(
        f"SMILE r={best['router_rank']} k={best['expert_rank']} top{best['top_k']}",
        best["test"],
        best["params"],
    )
    return res


def main():
    ap = report.parser(__doc__)
    ap.add_argument("--sets", default="full,lora", help="expert sets to run: full, lora or both")
    ap.add_argument("--quick", action="store_true", help="a 2-point SMILE grid (smoke test)")
    args = ap.parse_args()
    if args.quick:
        ROUTER_RANKS[:], EXPERT_RANKS[:], TOP_KS[:] = [4], [8, "full"], [1]
    log, elapsed = report.start(args.threads)

    results = {
        **report.provenance("benchmarks/quality/run.py"),
        "preset": args.preset,
        "config": tiny.PRESETS[args.preset],
        "param_budget": PARAM_BUDGET,
        "ties_density": TIES_DENSITY,
        "sets": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    discussion = HERE / "discussion.md"  # hand-written analysis of the latest run, appended if present
    for kind in args.sets.split(","):
        results["sets"][kind] = run_set(kind, args.preset, args.cache, log)
        results["seconds"] = elapsed()  # report after each set: partial runs count
        (args.out / "quality.json").write_text(json.dumps(results, indent=1))
        report.write(results, args.out, discussion.read_text() if discussion.exists() else "")
    log(f"done in {results['seconds']}s -> {args.out / 'quality.md'}")


if __name__ == "__main__":
    main()
