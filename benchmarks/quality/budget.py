"""Budgeted ranks (`--expert-rank auto --budget B`) against uniform ranks of the same parameter count (issue 6).

    python benchmarks/quality/budget.py [--threads 1] [--sets full,lora] [--budgets 1.25,1.5,2]

Reuses the cached tiny Llama base and experts of benchmarks/quality (tiny.build_or_load). For each expert set and
budget B (total parameters, times the base's): `uniform` = router rank 8 and the largest expert rank k, the same
in every module, whose model fits B; `auto` = router rank 8, expert ranks allocated per module and expert under B;
`auto+router` = the same with `--router-rank auto`. Each is built with `smile upscale`, loaded with
trust_remote_code and scored (exact match, normalised by each expert's own accuracy) with faithful routing
(top-2, the quality benchmark's headline), with oracle routing (every SmileLinear adds the task's own expert:
how well the kept factors reproduce the experts) and with `--routing prompt-model` (top-1, the best data-free
variant of docs/results/routing.md). `uniform, over budget` (rank k + 1) brackets the budget from above, since
the uniform rank leaves part of the budget unused. Writes docs/results/budget.md and budget.json.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]  # tiny_experts: scripts/

import evaluate as E  # noqa: E402
import report  # noqa: E402
from run import normalised  # noqa: E402
from smile_grid import upscale  # noqa: E402

from tiny_experts import models as tiny  # noqa: E402

ROUTER_RANK = 8


def uniform_rank(base, experts, budget: float) -> int:
    from smile_cli.inspection import rank_for_budget
    from smile_cli.options import UpscaleOptions
    from smile_cli.planning import load_plan

    plan = load_plan(UpscaleOptions(base=str(base), experts=[str(e) for e in experts], expert_rank=1))
    return rank_for_budget(plan, ROUTER_RANK, int(budget * plan.base_params))


def run_set(kind, args, log) -> dict:
    models = tiny.build_or_load(args.cache, args.preset, lora=(kind == "lora"), log=log)
    names = models["tasks"]
    expert_of = {t: i for i, t in enumerate(names)}
    _, test = tiny.held_out(names)
    base_params = E.count_params(tiny.load(models["base"]))
    own = {t: E.accuracy(tiny.load(folder), {t: test[t]})[t] for t, folder in models["experts"].items()}
    experts = list(models["experts"].values())
    out = args.cache / "smile-tmp" / f"budget-{kind}"
    res = {"tasks": names, "base_params": base_params, "expert_own_test": own, "budgets": {}}
    for budget in args.budgets:
        k = uniform_rank(models["base"], experts, budget)
        settings = {
            "uniform": (ROUTER_RANK, k, ()),
            "uniform, over budget": (ROUTER_RANK, k + 1, ()),  # brackets the budget from above
            "auto": (ROUTER_RANK, "auto", ("--budget", f"{budget}x")),
            "auto+router": ("auto", "auto", ("--budget", f"{budget}x")),
        }
        rows = {}
        for name, (router, expert, extra) in settings.items():
            t0 = time.time()
            upscale(models["base"], experts, out, router, expert, 2, ("--routing", "faithful", *extra))
            model = tiny.load(out)
            config = json.loads((out / "config.json").read_text())
            ranks = config.get("smile_ranks") or {}
            faithful = E.accuracy(model, test)
            oracle = E.oracle_accuracy(model, test, expert_of)
            row = dict(
                params=E.count_params(model),
                expert_rank=expert if expert != "auto" else None,
                ranks=ranks,
                faithful=dict(test=faithful, norm=normalised(faithful, own)),
                oracle=dict(test=oracle, norm=normalised(oracle, own)),
            )
            upscale(models["base"], experts, out, router, expert, 1, ("--routing", "prompt-model", *extra))
            prompt = E.accuracy(tiny.load(out), test)
            row["prompt_model"] = dict(test=prompt, norm=normalised(prompt, own))
            rows[name] = row
            log(
                f"[{kind}] budget {budget}x {name}: params {row['params'] / base_params:.3f}x faithful "
                f"{row['faithful']['norm']:.3f} oracle {row['oracle']['norm']:.3f} "
                f"prompt-model {row['prompt_model']['norm']:.3f} ({time.time() - t0:.0f}s)"
            )
        res["budgets"][str(budget)] = rows
    return res


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _rank_summary(ranks: dict, tasks: list[str]) -> str:
    """Mean expert rank per task's expert, and the range over modules."""
    if not ranks:
        return ""
    per_expert = list(zip(*(r["experts"] for r in ranks.values()), strict=True))
    routers = sorted({r["router"] for r in ranks.values()})
    parts = [f"{t} {sum(k) / len(k):.1f} ({min(k)}-{max(k)})" for t, k in zip(tasks, per_expert, strict=True)]
    return "expert ranks mean (range): " + ", ".join(parts) + f"; router ranks {routers[0]}-{routers[-1]}"


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Budgeted ranks vs uniform ranks at the same parameter count",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results['seconds']} s  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/budget.py`; raw numbers (every module's ranks included) in `budget.json`.",
        "Models: the quality benchmark's tiny Llama (4 layers, hidden 128) and its four task experts "
        "(docs/results/quality.md). Normalised accuracy (%) on the test split: accuracy on each task over the "
        "task's own expert's accuracy, averaged over tasks.",
        "",
        "- uniform: router rank 8, the largest expert rank that fits the budget, the same in every module; "
        "uniform, over budget: one rank more (above the budget: the two bracket it);",
        "- auto: router rank 8, `--expert-rank auto --budget B` (ranks per module and expert from the updates' "
        "singular values);",
        "- auto+router: the same with `--router-rank auto`.",
        "- faithful: the paper's router, top-2; oracle: every SmileLinear adds only the task's own expert "
        "(what the kept factors can do at best); prompt-model: `--routing prompt-model`, top-1.",
        "",
    ]
    for kind, res in results["sets"].items():
        lines += [
            f"## {kind} experts",
            "",
            "| budget | setting | params | faithful | oracle | prompt-model |",
            "|---|---|---:|---:|---:|---:|",
        ]
        notes = []
        for budget, rows in res["budgets"].items():
            for name, row in rows.items():
                label = f"{name} (k={row['expert_rank']})" if row["expert_rank"] else name
                lines.append(
                    f"| {budget}x | {label} | {row['params'] / res['base_params']:.3f}x | "
                    f"{_pct(row['faithful']['norm'])} | {_pct(row['oracle']['norm'])} | "
                    f"{_pct(row['prompt_model']['norm'])} |"
                )
                if row["ranks"]:
                    notes.append(f"- {budget}x {name}: {_rank_summary(row['ranks'], res['tasks'])}")
        lines += ["", *notes, ""]
    if results.get("discussion"):
        lines += ["## Discussion", "", results["discussion"].strip(), ""]
    (out / "budget.md").write_text("\n".join(lines) + "\n")


def main():
    ap = report.parser(__doc__)
    ap.add_argument("--sets", default="full,lora")
    ap.add_argument("--budgets", default="1.25,1.5,2")
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    log, elapsed = report.start(args.threads)

    results = {**report.provenance("benchmarks/quality/budget.py"), "sets": {}}
    discussion = HERE / "budget_discussion.md"
    results["discussion"] = discussion.read_text() if discussion.exists() else ""
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.sets.split(","):
        results["sets"][kind] = run_set(kind, args, log)
        results["seconds"] = elapsed()
        (args.out / "budget.json").write_text(json.dumps(results, indent=1))
        write_report(results, args.out)
    log(f"done in {results['seconds']}s -> {args.out / 'budget.md'}")


if __name__ == "__main__":
    main()
