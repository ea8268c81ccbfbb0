"""docs/results/quality.md and its plots, from the results dict that run.py builds."""

import argparse
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line every benchmarks/quality script shares: --preset, --cache, --out, --threads."""
    from tiny_experts import models as tiny

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench", choices=sorted(tiny.PRESETS))
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "docs" / "results")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return ap


def start(threads: int):
    """Torch threads and seed, transformers quiet; returns (log(msg) with the seconds elapsed, elapsed())."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    return log, lambda: round(time.time() - started, 1)


def provenance(script: str) -> dict:
    """Command, date and machine of a benchmark run, recorded next to its numbers."""
    import torch
    import transformers

    return {
        "command": f"python {script}" + "".join(" " + shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }


def _train_total(results) -> float:
    """Seconds spent training every cached model once (the base counted once)."""
    total, base = 0.0, 0.0
    for res in results["sets"].values():
        seconds = res.get("train_seconds", {})
        base = seconds.get("base", base)
        total += sum(v for k, v in seconds.items() if k != "base")
    return total + base


def _pct(x):
    return f"{100 * x:.1f}"


def _ratio(params, base):
    return f"{params / base:.2f}x"


def _accuracy_table(res) -> list[str]:
    tasks, base = res["tasks"], res["base_params"]
    lines = [
        "| model | " + " | ".join(tasks) + " | mean acc | normalised | params |",
        "|---|" + "---:|" * (len(tasks) + 3),
    ]
    for name, row in res["rows"].items():
        acc = row["test"]
        label = name + (f" (scale {row['scale']})" if "scale" in row else "")
        cells = [_pct(acc[t]) for t in tasks]
        mean = sum(acc.values()) / len(acc)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_pct(mean)} | {_pct(row['norm'])} | "
            f"{_ratio(row['params'], base)} |"
        )
    return lines


def _grid_table(res, top_k) -> list[str]:
    grid = [g for g in res["grid"] if g["top_k"] == top_k]
    routers = sorted({g["router_rank"] for g in grid})
    experts = list(dict.fromkeys(g["expert_rank"] for g in grid))
    lines = [
        "| expert rank \\ router rank | " + " | ".join(str(r) for r in routers) + " | oracle routing |",
        "|---|" + "---:|" * (len(routers) + 1),
    ]
    for k in experts:
        cells = []
        for r in routers:
            g = next(g for g in grid if g["router_rank"] == r and g["expert_rank"] == k)
            cells.append(f"{_pct(g['norm'])} ({_ratio(g['params'], res['base_params'])})")
        oracle = res["oracle"].get(str(k))
        cells.append(_pct(oracle["norm"]) if oracle else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _routing_table(entry, tasks) -> list[str]:
    n_layers = len(next(iter(entry["routing"].values())))
    lines = [
        "| task | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " | mean |",
        "|---|" + "---:|" * (n_layers + 1),
    ]
    for t in tasks:
        v = entry["routing"][t]
        lines.append(f"| {t} | " + " | ".join(_pct(x) for x in v) + f" | {_pct(sum(v) / len(v))} |")
    return lines


def _diagnostics(res) -> list[str]:
    d, head, tasks = res.get("diagnostics"), res["headline"], res["tasks"]
    if not d:
        return []
    ranks = list(d["energy"][0])
    lines = [
        "Diagnostics. Share of each task update's energy "
        "(||dW||_F^2) in its top singular values, averaged over the upscaled projections:",
        "",
        "| expert | " + " | ".join(f"rank {r}" for r in ranks) + " |",
        "|---|" + "---:|" * len(ranks),
    ]
    for t, e in zip(tasks, d["energy"], strict=True):
        lines.append(f"| {t} | " + " | ".join(_pct(e[r]) for r in ranks) + " |")
    projections = list(d["overlap_by_proj"])
    by_proj = head.get("routing_by_projection", {})
    lines += [
        "",
        f"Router subspace overlap between experts (mean squared cosine of their top-{d['router_rank']} right "
        "singular subspaces; 0 = orthogonal, 100 = identical; 'random' = expected for random subspaces) and "
        "the headline model's routing accuracy per projection type (%, averaged over layers):",
        "",
        "| | " + " | ".join(projections) + " |",
        "|---|" + "---:|" * len(projections),
        "| router overlap | " + " | ".join(_pct(d["overlap_by_proj"][p]) for p in projections) + " |",
        "| random overlap | " + " | ".join(_pct(d["overlap_random"][p]) for p in projections) + " |",
    ]
    for t in by_proj:
        lines.append(f"| routing acc, {t} | " + " | ".join(_pct(by_proj[t][p]) for p in projections) + " |")
    confusion = head.get("routing_confusion")
    if confusion:
        lines += [
            "",
            "Routing confusion of the headline model: share (%) of each task's tokens whose top expert is the "
            "column's expert, averaged over every SmileLinear:",
            "",
            "| task \\ expert | " + " | ".join(tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(_pct(x) for x in confusion[t]) + " |")
    return lines + [""]


def _mean_routing(entry) -> float:
    vals = [x for v in entry["routing"].values() for x in v]
    return sum(vals) / len(vals)


def _plots(results, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for kind, res in results["sets"].items():
        base = res["base_params"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for top, marker in [(1, "o"), (2, "s")]:
            pts = [g for g in res["grid"] if g["top_k"] == top]
            ax.scatter(
                [g["params"] / base for g in pts],
                [100 * g["norm"] for g in pts],
                marker=marker,
                alpha=0.6,
                label=f"SMILE top-{top} (router x expert rank grid)",
            )
        oracle_pts = []
        for k, o in res["oracle"].items():
            cheapest = min((g for g in res["grid"] if str(g["expert_rank"]) == k), key=lambda g: g["params"])
            oracle_pts.append((cheapest["params"] / base, 100 * o["norm"]))
        ax.scatter(
            *zip(*oracle_pts, strict=True),
            marker="o",
            facecolors="none",
            edgecolors="k",
            s=60,
            label="SMILE with oracle routing (per expert rank)",
        )
        for name, style in [("simple average", "v"), ("task arithmetic", "^"), ("TIES", "D"), ("base", "x")]:
            row = res["rows"][name]
            ax.scatter([row["params"] / base], [100 * row["norm"]], marker=style, s=70, label=name)
        n = len(res["tasks"])
        ax.scatter([n], [100], marker="*", s=150, color="k", label=f"{n} separate experts")
        ax.axvline(results["param_budget"], color="grey", ls=":", lw=1)
        ax.axhline(97, color="grey", ls="--", lw=1)
        ax.set_xlabel("parameters relative to the base")
        ax.set_ylabel("normalised accuracy (%)")
        ax.set_title(f"Task retention, {kind} fine-tuned experts")
        ax.legend(fontsize=7, loc="center right")
        ax.grid(alpha=0.3)
        name = f"quality_{kind}_accuracy_vs_params.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

        head = res["headline"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in res["tasks"]:
            v = head["routing"][t]
            ax.plot(range(len(v)), [100 * x for x in v], marker="o", label=t)
        ax.axhline(100 / len(res["tasks"]), color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("decoder layer")
        ax.set_xticks(range(len(next(iter(head["routing"].values())))))
        ax.set_ylabel("tokens routed to own expert (%)")
        ax.set_ylim(0, 102)
        ax.set_title(
            f"Routing accuracy, {kind} experts, SMILE r={head['router_rank']} k={head['expert_rank']} "
            f"top{head['top_k']}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        name = f"quality_{kind}_routing_per_layer.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write(results: dict, out: Path, discussion: str = "") -> Path:
    out = Path(out)
    plots = _plots(results, out)
    cfg = results["config"]
    md = [
        "# Task retention: SMILE vs merging baselines on a tiny Llama",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results['seconds']:.0f} s (training included only when the model cache was cold); "
        f"training when first built: {_train_total(results):.0f} s in all  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/report.py`; raw numbers in `quality.json`.",
        "",
        "## Setup",
        "",
        f"- Model: LlamaForCausalLM, {cfg['layers']} layers, hidden {cfg['hidden']}, intermediate "
        f"{cfg['intermediate']}, {cfg['heads']} heads, character vocabulary (built in code), fixed seeds.",
        f"- Base: {cfg['pretrain_steps']} steps of next-token pre-training on generic sequences (random words, "
        "copies, alphabet runs over the same characters). No task mapping is ever shown to it.",
        f"- Tasks (no task-id token; the format identifies the task): {', '.join(cfg['tasks'])} "
        "(see `scripts/tiny_experts/tasks.py`).",
        f"- Full experts: {cfg['finetune_steps']} steps of fine-tuning of every decoder projection "
        "(q,k,v,o,gate,up,down of all layers; embeddings, norms and lm_head frozen, i.e. exactly the weights "
        f"SMILE upscales), lr {cfg['finetune_lr']}, answer-only loss.",
        f"- LoRA experts: peft LoRA rank {cfg['lora_rank']} on the same projections, {cfg['lora_steps']} "
        "steps, merged with merge_and_unload() and saved as full checkpoints.",
        "- Evaluation: exact match, greedy decoding (batched, KV cache), held-out prompts never seen in "
        "training; 150 test and 50 validation examples per task. Normalised accuracy = accuracy on task t "
        "divided by expert t's own accuracy on t, averaged over tasks.",
        "- Baselines: simple average; task arithmetic and TIES (density "
        f"{results['ties_density']}, trim / elect sign / disjoint mean), scales tuned on the validation split.",
        "- SMILE: `smile upscale` (this project's CLI) over router rank {1,2,4,8,16} x expert rank "
        "{4,8,16,32,full} x top-k {1,2}, loaded with AutoModelForCausalLM(trust_remote_code=True). The "
        f"headline SMILE row is the grid point with at most {results['param_budget']}x base parameters that "
        "scores best on the validation split (not chosen on test).",
        "- Routing accuracy: share of a task's tokens (prompt + gold answer, teacher forced) whose top-weighted "
        "expert is the task's own, per decoder layer, averaged over the layer's seven SmileLinear modules.",
        "- Oracle routing: every SmileLinear forced to add only the task's own expert (one-hot routing weights).",
        "",
    ]
    for kind, res in results["sets"].items():
        head = res["headline"]
        train = res.get("train_seconds", {})
        md += [
            f"## {kind.capitalize()} fine-tuned experts",
            "",
            "Training time when first built (s, on this machine): "
            + ", ".join(f"{k} {v:.0f}" for k, v in train.items()),
            "",
            f"Base parameters: {res['base_params']:,}. Accuracy (%) on the test split:",
            "",
            *_accuracy_table(res),
            "",
            f"Headline: SMILE router rank {head['router_rank']}, expert rank {head['expert_rank']}, "
            f"top-{head['top_k']} keeps **{_pct(head['norm'])}%** of the experts' accuracy at "
            f"{_ratio(head['params'], res['base_params'])} base parameters "
            f"(target: >= 97% at <= {results['param_budget']}x); mean routing accuracy {_pct(_mean_routing(head))}%.",
            "",
        ]
        for top in sorted({g["top_k"] for g in res["grid"]}):
            md += [
                f"SMILE grid, top-{top}: normalised accuracy % (parameters vs base); last column: oracle routing "
                "at that expert rank.",
                "",
                *_grid_table(res, top),
                "",
            ]
        md += [
            f"Routing accuracy (%) per layer of the headline model (chance = {100 / len(res['tasks']):.0f}%):",
            "",
            *_routing_table(head, res["tasks"]),
            "",
        ]
        md += [f"![{name}]({name})" for name in plots if f"_{kind}_" in name] + [""]
        md += _diagnostics(res)
    if discussion:
        md += ["## Discussion", "", discussion.strip(), ""]
    path = out / "quality.md"
    path.write_text("\n".join(md))
    return path
