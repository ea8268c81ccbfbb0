"""Human-readable text of every command, in one place: the dry run's plan, `smile inspect`'s tables, `smile route`'s
per-layer shares. (The model card, markdown written into the output, is output.py's.) The commands compute dicts
(their --json output); what is here only formats them.
"""

from __future__ import annotations

from smile_cli.kept import grouped
from smile_cli.plan import format_mean_ranks


def input_rows(summary: dict) -> list[tuple[str, str]]:
    """Where each input is read from, and the disk each --inputs mode needs (hub_session.inputs_summary)."""
    if "disk_bytes_by_mode" not in summary:
        return []
    rows = []
    for entry in summary["inputs"]:
        where = f"{entry['ref']}@{entry['commit'][:12]}" if entry.get("commit") else entry["ref"]
        size = f"{entry['weight_bytes'] / 1e9:.3f} GB of weights"
        if entry["mode"] == "local":
            rows.append(("input", f"{where}: local folder, {size}"))
        else:
            cached = entry["cached_bytes"] / 1e9
            rows.append(("input", f"{where}: Hub, {entry['files']} file(s), {size}, {cached:.3f} GB in the cache"))
    disk = summary["disk_bytes_by_mode"]
    for mode in ("stream", "auto", "download"):
        what = "the output only" if disk[mode] == summary["output_bytes"] else "the output + weights not cached"
        rows.append((f"disk --inputs {mode}", f"{disk[mode] / 1e9:.3f} GB ({what})"))
    return rows


def format_plan(summary: dict) -> str:
    """The dry run's plan (upscale --dry-run): one aligned row per fact."""
    rows = [
        ("base", summary["base"]),
        ("experts", ", ".join(summary["experts"])),
        ("architecture", summary["architecture"]),
        ("upscaled linears", str(summary["upscaled_linears"])),
        ("targeted modules", "\n".join(f"{' ' * 20}{m}" for m in summary["targeted_modules"]).lstrip()),
        ("copied tensors", str(summary["copied_tensors"])),
        ("routing", summary["routing"] + (f" (auto: {summary['routing_auto']})" if summary["routing_auto"] else "")),
        (
            "output",
            f"{summary['output_tensors']} tensors, {summary['output_bytes'] / 1e9:.3f} GB in "
            f"{summary['shards']} file(s), {summary['dtype']}",
        ),
        (
            "parameters",
            f"{summary['params']:,} ({summary['params_ratio']}x the base's {summary['base_params']:,})",
        ),
        ("peak memory (est.)", f"{summary['peak_memory_estimate_bytes'] / 2**30:.2f} GiB"),
    ]
    if "calibration" in summary:  # --calibrate: checked; the routers are fitted when the output is built
        counts = ", ".join(map(str, summary["calibration"]["prompts_per_expert"]))
        rows.append(("calibration", f"{counts} prompt(s) per expert; routers fitted when the output is built"))
    for kind, r in (summary.get("ranks_by_kind") or {}).items():  # allocated (auto) ranks: means over layers
        rows.append((f"ranks {kind}", format_mean_ranks(r)))
    vocabulary = summary.get("vocabulary")
    if vocabulary:
        new = ", ".join(f"{token} (id {i})" for token, i in vocabulary["new_tokens"].items())
        rows.append(
            (
                "tokenizer",
                f"{vocabulary['tokenizer']}, {vocabulary['vocab_size']} rows" + (f"; new: {new}" if new else ""),
            )
        )
        rows += [("", note) for note in vocabulary["notes"]]
        rows.append(("chat template", vocabulary["chat_template"]))
    rows += [("changed, base kept", line) for line in grouped(summary.get("kept_differences") or [])]
    rows += input_rows(summary)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def params_table(report: dict) -> list[tuple[str, str]]:
    """(model, parameters) rows of an inspect report: the base, SMILE at the given ranks, the budget's fit."""
    p = report["params"]
    rows = [
        ("base", f"{p['base']:,}"),
        (f"SMILE (router {report['router_rank']}, expert {report['expert_rank']})", f"{p['smile']:,} ({p['ratio']}x)"),
    ]
    b = report["budget"]
    if b:
        fit = b["expert_rank"] if b["expert_rank"] else "none fits"
        rows.append((f"budget {b['budget']} ({b['params']:,})", f"expert rank {fit}"))
        if b["model_params"]:
            rows.append(("  at that rank", f"{b['model_params']:,} ({b['model_params'] / p['base']:.4f}x)"))
        if b.get("allocated"):  # --expert-rank auto under the same budget
            params = b["allocated"]["model_params"]
            rows.append(("  ranks allocated (auto)", f"{params:,} ({params / p['base']:.4f}x)"))
            for kind, r in b["allocated"]["ranks_by_kind"].items():
                rows.append((f"    {kind}", "expert ranks " + ", ".join(f"{k:g}" for k in r["experts"])))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_inspection(report: dict, console) -> None:
    """`smile inspect`'s report as rich tables on console."""
    from rich.table import Table

    experts = report["experts"]
    table = Table(title=f"Task updates (energy kept; rank for {int(report['energy_level'] * 100)}% energy)")
    table.add_column("module", overflow="fold")
    for column in ("expert", "energy@router", "energy@expert", "energy@budget", "rank_90", "eff. rank"):
        table.add_column(column, justify="right")
    for layer in report["layers"]:
        for record in layer["experts"]:
            rank_90 = record["rank_90"] or f">{len(record['singular_values'])}" if not record["zero"] else "-"
            table.add_row(
                layer["module"] if record["index"] == 0 else "",
                str(record["index"]),
                *(_fmt(record[key]) for key in ("energy_router", "energy_expert", "energy_budget")),
                str(rank_90),
                _fmt(record["effective_rank"], 1),
            )
    console.print(table)
    kinds = Table(title="Per kind: mean energy kept at the expert rank, router-subspace overlap of expert pairs")
    kinds.add_column("kind", overflow="fold")
    for i in range(len(experts)):
        kinds.add_column(f"expert {i}", justify="right")
    kinds.add_column("overlap mean", justify="right")
    kinds.add_column("overlap max", justify="right")
    for row in report["kinds"]:
        energies = [_fmt(e["energy_expert"]) for e in row["experts"]]
        kinds.add_row(row["kind"], *energies, _fmt(row["overlap_mean"]), _fmt(row["overlap_max"]))
    console.print(kinds)
    params = Table(title="Parameters")
    params.add_column("model")
    params.add_column("parameters", justify="right")
    for name, value in params_table(report):
        params.add_row(name, value)
    console.print(params)
    for i, ref in enumerate(experts):
        console.print(f"expert {i}: {ref}")


def print_routing(inputs: list[tuple[str, dict]], experts: list[str]) -> None:
    """Per prompt or image, a table of layers: the share of (token, projection) decisions each expert got."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for label, record in inputs:
        table = Table(title=label[:100], title_justify="left")
        table.add_column("layer")
        for name in experts:
            table.add_column(name, justify="right")
        for row in record["summary"]:
            best = max(row["share"])
            cells = [f"[bold]{s:.0%}[/bold]" if s == best else f"{s:.0%}" for s in row["share"]]
            table.add_row(row["layer"], *cells)
        console.print(table)
