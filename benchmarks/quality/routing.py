"""Routing variants of `smile upscale --routing` against faithful SMILE and oracle routing (issues 7, 12).

    python benchmarks/quality/routing.py [--threads 1] [--sets full,lora] [--router-rank 8] [--expert-rank 16]
        [--variants a,b,...] [--unpadded a,b,...] [--diagnose a,b,...] [--report-only]

Reuses the cached tiny Llama base and experts of benchmarks/quality (tiny.build_or_load; trained only when the
cache is cold). For each expert set and each routing variant: `smile upscale --routing NAME` (in-process CLI,
float32), loaded with trust_remote_code, then exact-match accuracy (batched greedy decoding with the KV cache),
normalised accuracy (over each expert's own accuracy), and routing accuracy per decoder layer and per
projection, separately on prompt tokens and on answer tokens (teacher forced). Oracle routing (every
SmileLinear forced to the task's own expert) gives the ceiling at the same ranks. The --unpadded variants are also
decoded one prompt at a time (no padding, no mask, KV cache). The --diagnose variants are re-run with oracle
routing forced on parts of each sequence (the prompt, the generated tokens, the first k prompt tokens, ...). Writes
docs/results/routing.md, routing.json and PNG plots; benchmarks/quality/routing_discussion.md (hand-written)
is appended when present.
"""

import contextlib
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]  # tiny_experts: scripts/

import evaluate as E  # noqa: E402
import report  # noqa: E402
import routing_variants as RV  # noqa: E402
import torch  # noqa: E402

from smile_cli.modeling.modeling_smile import ROUTING_MODES  # noqa: E402
from tiny_experts import models as tiny  # noqa: E402
from tiny_experts.evaluate import _left_pad, generate  # noqa: E402

# the routing modes modeling_smile.py keeps (`smile upscale --routing NAME`); the others are routing_variants.py's
KEPT = list(ROUTING_MODES)
VARIANTS = KEPT + list(RV.VARIANTS)
UNPADDED_VARIANTS = KEPT + ["sequence-model", "spectral-sequence", "decay-0.6", "spectral-first-layer"]
DIAGNOSE = ["faithful", "sequence-model", "spectral-sequence", "spectral-first-layer"]
# oracle routing forced on: nothing, the prompt (prefill call), the generated tokens, the first k real prompt
# tokens, the prompt after its first k tokens, everything
PARTS = ["none", "prompt", "answer", "first1", "first2", "first4", "first8", "after4", "all"]
UNPADDED = 40  # test prompts per task also decoded one at a time (no padding, KV cache): the single-prompt path
PARAM_BUDGET = 2.0
TARGET_GAP_CLOSED = 0.8


def normalised(acc: dict, own: dict) -> float:
    ratios = [acc[t] / own[t] for t in acc if own[t] > 0]
    return sum(ratios) / max(1, len(ratios))


def upscale(base, experts, out: Path, router_rank, expert_rank, top_k, routing) -> Path:
    from smile_cli.cli import run

    argv = [
        "upscale", "--base", str(base), "--experts", ",".join(str(e) for e in experts), "--out", str(out),
        "--router-rank", str(router_rank), "--expert-rank", str(expert_rank), "--top-k", str(top_k),
        "--routing", routing, "--dtype", "float32", "--force", "--quiet",
    ]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run(argv)
    if rc != 0:
        raise RuntimeError(f"smile {' '.join(argv)} failed (exit {rc}): {err.getvalue().strip()}")
    return out


@torch.inference_mode()
def routing_by_segment(model, examples, expert_of_task) -> dict:
    """{task: {segment: {"layer": [share per decoder layer], "projection": {proj: share}}}} for segment in
    prompt (BOS + prompt characters) and answer (answer characters): share of the segment's tokens whose
    top-weighted expert is the task's own (teacher forced on prompt + gold answer, right padding excluded)."""
    result = {}
    for task, pairs in examples.items():
        ids, mask = E.teacher_forced_batch(pairs)
        segment = torch.zeros_like(ids)  # 1 prompt, 2 answer, 0 padding / EOS
        for i, (p, a) in enumerate(pairs):
            segment[i, : 1 + len(p)] = 1
            segment[i, 1 + len(p) : 1 + len(p) + len(a)] = 2
        segment = segment.flatten()
        own = expert_of_task[task]
        hits: dict[str, dict[str, float]] = {}

        def record(name, w, hits=hits, own=own, segment=segment):
            top = w.argmax(dim=-1)
            hits[name] = {
                seg: (top[segment == code] == own).float().mean().item() for seg, code in (("prompt", 1), ("answer", 2))
            }

        with E.routing_hook(model, record):
            model(input_ids=ids, attention_mask=mask)
        out = {}
        for seg in ("prompt", "answer"):
            layers: dict[int, list[float]] = {}
            projections: dict[str, list[float]] = {}
            for n, v in hits.items():
                layers.setdefault(E._layer_index(n), []).append(v[seg])
                projections.setdefault(n.rsplit(".", 1)[-1], []).append(v[seg])
            out[seg] = {
                "layer": [sum(v) / len(v) for _, v in sorted(layers.items())],
                "projection": {p: sum(v) / len(v) for p, v in projections.items()},
            }
        result[task] = out
    return result


def mean_routing(routing: dict, seg: str) -> float:
    values = [v for r in routing.values() for v in r[seg]["layer"]]
    return sum(values) / len(values)


def oracle_parts(model, examples, expert_of_task, own, parts) -> dict:
    """{part: normalised accuracy} with the task's own expert forced (routing hook) on `part` of each sequence
    only (PARTS), the model's own routing elsewhere; each task decoded on its own (batched, left padding)."""
    result = {}
    for part in parts:
        acc = {}
        for task, pairs in examples.items():
            prompts = [p for p, _ in pairs]
            real = _left_pad(prompts)[1].bool()  # the padding E.generate uses
            rank = real.long().cumsum(dim=1) - 1  # index of each real prompt token

            def force(name, w, part=part, e=expert_of_task[task], real=real, rank=rank):
                if w.dim() == 3 and w.shape[1] > 1:  # the prefill call: the prompt
                    if part.startswith("first"):
                        where = real & (rank < int(part[5:]))
                    elif part.startswith("after"):
                        where = real & (rank >= int(part[5:]))
                    else:
                        where = real if part in ("prompt", "all") else torch.zeros_like(real)
                else:  # a decoding step: generated tokens
                    where = torch.full(w.shape[:-1], part in ("answer", "all"))
                if part == "all":
                    where = torch.ones(w.shape[:-1], dtype=torch.bool)
                if not where.any():
                    return None
                one = torch.nn.functional.one_hot(torch.tensor(e), w.shape[-1]).to(w)
                return torch.where(where.unsqueeze(-1), one, w)

            handle = model.register_routing_hook(force)
            try:
                preds = generate(model, prompts)
            finally:
                handle.remove()
            acc[task] = sum(p == a for p, (_, a) in zip(preds, pairs, strict=True)) / len(pairs)
        result[part] = dict(test=acc, norm=normalised(acc, own))
    return result


def load_variant(variant, models, out, args) -> torch.nn.Module:
    """A SMILE model routing with `variant`: built with --routing for a kept mode, else the faithful model with
    the routing_variants.py variant installed."""
    experts = list(models["experts"].values())
    mode = variant if variant in KEPT else "faithful"
    upscale(models["base"], experts, out, args.router_rank, args.expert_rank, args.top_k, mode)
    assert json.loads((out / "config.json").read_text())["smile_routing"] == mode
    model = tiny.load(out)
    return model if variant in KEPT else RV.install(model, variant)


def run_set(kind, args, log) -> dict:
    models = tiny.build_or_load(args.cache, args.preset, lora=(kind == "lora"), log=log)
    names = models["tasks"]
    expert_of = {t: i for i, t in enumerate(names)}
    val, test = tiny.held_out(names)
    routing_examples = {t: test[t][:60] for t in names}
    base_params = E.count_params(tiny.load(models["base"]))
    own_test, own_val = {}, {}
    for t, folder in models["experts"].items():
        expert = tiny.load(folder)
        own_test[t] = E.accuracy(expert, {t: test[t]})[t]
        own_val[t] = E.accuracy(expert, {t: val[t]})[t]
    res = {"tasks": names, "base_params": base_params, "expert_own_test": own_test, "variants": {}, "diagnosis": {}}
    out = args.cache / "smile-tmp" / f"routing-{kind}"
    for variant in VARIANTS:
        t0 = time.time()
        model = load_variant(variant, models, out, args)
        te = E.accuracy(model, test)
        v = E.accuracy(model, val)
        entry = dict(
            source="modeling_smile.py" if variant in KEPT else "routing_variants.py",
            causal=variant == "faithful" or variant in RV.CAUSAL,
            test=te,
            norm=normalised(te, own_test),
            val_norm=normalised(v, own_val),
            params=E.count_params(model),
            routing=routing_by_segment(model, routing_examples, expert_of),
        )
        if variant in UNPADDED_VARIANTS:
            subset = {t: test[t][:UNPADDED] for t in names}
            batched = E.predictions(model, subset)
            alone = {t: generate(model, [p for p, _ in pairs], batch_size=1) for t, pairs in subset.items()}
            entry["unpadded_norm"] = normalised(E.exact_match(alone, subset), own_test)
            entry["unpadded_differ"] = sum(a != b for t in names for a, b in zip(alone[t], batched[t], strict=True))
        res["variants"][variant] = entry
        if "oracle" not in res:
            oracle = E.oracle_accuracy(model, test, expert_of)
            res["oracle"] = dict(test=oracle, norm=normalised(oracle, own_test))
        if variant in DIAGNOSE:
            res["diagnosis"][variant] = oracle_parts(model, test, expert_of, own_test, PARTS)
        log(
            f"[{kind}] {variant}: norm {entry['norm']:.3f} (val {entry['val_norm']:.3f}) routing prompt "
            f"{mean_routing(entry['routing'], 'prompt'):.3f} answer {mean_routing(entry['routing'], 'answer'):.3f} "
            + (f"one prompt {entry['unpadded_norm']:.3f} " if "unpadded_norm" in entry else "")
            + f"({time.time() - t0:.1f}s)"
        )
    faithful, oracle = res["variants"]["faithful"]["norm"], res["oracle"]["norm"]
    for entry in [*res["variants"].values(), *(p for d in res["diagnosis"].values() for p in d.values())]:
        entry["gap_closed"] = (entry["norm"] - faithful) / (oracle - faithful) if oracle > faithful else None
    return res


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(results: dict, out: Path, discussion: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Routing that holds up: data-free routing variants vs faithful SMILE and oracle routing",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results['seconds']:.0f} s  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/routing.py`; raw numbers in `routing.json`. Models: the cached tiny "
        "Llama base and four task experts of `benchmarks/quality` (see `quality.md` for the setup). Every SMILE "
        f"model: `smile upscale --router-rank {results['router_rank']} --expert-rank {results['expert_rank']} "
        f"--top-k {results['top_k']} --routing NAME --dtype float32` for the modes modeling_smile.py keeps (from: "
        "model file); the other rows (from: benchmark) are that command's faithful model with a router of "
        "`benchmarks/quality/routing_variants.py` swapped in (the modes removed from the model file, and the causal "
        "research modes). Loaded with trust_remote_code and decoded "
        "greedily with the KV cache (batched, left padding); 150 test and 50 validation prompts per task. "
        "Normalised accuracy: accuracy on task t / expert t's own accuracy, averaged over tasks. Gap closed: "
        "(variant - faithful) / (oracle - faithful) in normalised accuracy. Routing accuracy: share of tokens "
        "whose top-weighted expert is the task's own, teacher forced, averaged over the 28 SmileLinears "
        "(prompt = BOS + prompt characters; answer = answer characters; chance = 25%). No variant adds "
        f"parameters. One prompt, cached: the first {UNPADDED} test prompts per task decoded one at a time (no "
        "padding, no attention mask, KV cache), normalised; differ: how many of those completions differ from the "
        "batched, left-padded decoding of the same prompts.",
        "",
    ]
    for kind, res in results["sets"].items():
        tasks = res["tasks"]
        lines += [f"## {'Full fine-tuned' if kind == 'full' else 'LoRA'} experts", ""]
        lines += [
            "| routing | from | causal | " + " | ".join(tasks) + " | normalised (test) | normalised (val) | "
            "gap closed | routing acc prompt | routing acc answer | one prompt, cached | differ | params |",
            "|---|---|---|" + "---:|" * (len(tasks) + 8),
        ]
        for name, e in res["variants"].items():
            slow = "unpadded_norm" in e
            lines.append(
                f"| {name} | {'model file' if e['source'] == 'modeling_smile.py' else 'benchmark'} | "
                f"{'yes' if e['causal'] else 'no'} | "
                + " | ".join(_pct(e["test"][t]) for t in tasks)
                + f" | {_pct(e['norm'])} | {_pct(e['val_norm'])} | {_pct(e['gap_closed'])} | "
                f"{_pct(mean_routing(e['routing'], 'prompt'))} | {_pct(mean_routing(e['routing'], 'answer'))} | "
                + (f"{_pct(e['unpadded_norm'])} | {e['unpadded_differ']} / {UNPADDED * len(tasks)}" if slow else "|")
                + f" | {e['params'] / res['base_params']:.2f}x |"
            )
        o = res["oracle"]
        lines.append(
            "| oracle (own expert forced) | hook | - | "
            + " | ".join(_pct(o["test"][t]) for t in tasks)
            + f" | {_pct(o['norm'])} | - | 100.0 | 100.0 | 100.0 | | | same |"
        )
        lines.append(
            "| experts (own task) | | | " + " | ".join(_pct(res["expert_own_test"][t]) for t in tasks) + " | 100.0 | "
            "100.0 | | | | | | 1.00x each |"
        )
        if res.get("diagnosis"):
            lines += [
                "",
                "Where the gap comes from (causal research): oracle routing forced through the routing hook on part "
                "of each sequence only, the variant's own routing elsewhere; normalised accuracy (test) and, in "
                "brackets, the share of the faithful-to-oracle gap closed. prompt: every prompt token (the prefill "
                "call); answer: every generated token; first k: the first k real prompt tokens (BOS is the first); "
                "after 4: the prompt tokens after the first 4.",
                "",
                "| routing | " + " | ".join(f"oracle on {p}" for p in PARTS) + " |",
                "|---|" + "---:|" * len(PARTS),
            ]
            for name, parts in res["diagnosis"].items():
                cells = [f"{_pct(parts[p]['norm'])} ({_pct(parts[p]['gap_closed'])})" for p in PARTS if p in parts]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Routing accuracy (%) per decoder layer, averaged over tasks (prompt / answer tokens):", ""]
        n_layers = len(next(iter(res["variants"].values()))["routing"][tasks[0]]["prompt"]["layer"])
        lines += [
            "| routing | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
            "|---|" + "---:|" * n_layers,
        ]
        for name, e in res["variants"].items():
            cells = []
            for i in range(n_layers):
                p = sum(e["routing"][t]["prompt"]["layer"][i] for t in tasks) / len(tasks)
                a = sum(e["routing"][t]["answer"]["layer"][i] for t in tasks) / len(tasks)
                cells.append(f"{_pct(p)} / {_pct(a)}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        projections = list(next(iter(res["variants"].values()))["routing"][tasks[0]]["prompt"]["projection"])
        lines += ["", "Routing accuracy (%) per projection, averaged over layers and tasks (prompt / answer):", ""]
        lines += ["| routing | " + " | ".join(projections) + " |", "|---|" + "---:|" * len(projections)]
        for name, e in res["variants"].items():
            cells = []
            for p in projections:
                pr = sum(e["routing"][t]["prompt"]["projection"][p] for t in tasks) / len(tasks)
                an = sum(e["routing"][t]["answer"]["projection"][p] for t in tasks) / len(tasks)
                cells.append(f"{_pct(pr)} / {_pct(an)}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"![routing_{kind}_accuracy.png](routing_{kind}_accuracy.png)"]
        lines += [f"![routing_{kind}_per_layer.png](routing_{kind}_per_layer.png)", ""]

        names = list(res["variants"])
        fig, ax = plt.subplots(figsize=(9, 3.8))
        colors = ["tab:orange" if res["variants"][n]["causal"] else "tab:blue" for n in names]
        ax.bar(range(len(names)), [100 * res["variants"][n]["norm"] for n in names], color=colors)
        ax.axhline(100 * res["oracle"]["norm"], color="tab:green", ls="--", label="oracle routing")
        ax.axhline(100 * res["variants"]["faithful"]["norm"], color="tab:red", ls=":", label="faithful SMILE")
        f = res["variants"]["faithful"]["norm"]
        target = f + TARGET_GAP_CLOSED * (res["oracle"]["norm"] - f)
        ax.axhline(100 * target, color="gray", ls="-.", label="80% of the gap closed")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("normalised accuracy (%) (orange: causal)")
        ax.set_title(
            f"{kind} experts: routing variants (r={results['router_rank']}, k={results['expert_rank']}, "
            f"top-{results['top_k']}, {res['variants']['faithful']['params'] / res['base_params']:.2f}x params)",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"routing_{kind}_accuracy.png", dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, seg in zip(axes, ("prompt", "answer"), strict=True):
            for n in [n for n in names if "unpadded_norm" in res["variants"][n]]:  # the main ones: readable
                e = res["variants"][n]
                per_layer = [
                    100 * sum(e["routing"][t][seg]["layer"][i] for t in tasks) / len(tasks) for i in range(n_layers)
                ]
                ax.plot(range(n_layers), per_layer, marker="o", label=n)
            ax.axhline(25, color="gray", ls=":", lw=1)
            ax.set_title(f"{kind}: routing accuracy, {seg} tokens", fontsize=9)
            ax.set_xlabel("decoder layer")
            ax.set_xticks(range(n_layers))
        axes[0].set_ylabel("% tokens routed to own expert")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"routing_{kind}_per_layer.png", dpi=110)
        plt.close(fig)
    if discussion:
        lines += ["## Discussion", "", discussion.strip(), ""]
    (out / "routing.md").write_text("\n".join(lines) + "\n")


def main():
    ap = report.parser(__doc__)
    ap.add_argument("--sets", default="full,lora")
    ap.add_argument("--router-rank", type=int, default=8)
    ap.add_argument("--expert-rank", default="16")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--unpadded", default=",".join(UNPADDED_VARIANTS), help="also decoded one prompt at a time")
    ap.add_argument("--diagnose", default=",".join(DIAGNOSE), help="variants re-run with oracle routing on parts")
    ap.add_argument("--report-only", action="store_true", help="rewrite routing.md and plots from routing.json")
    args = ap.parse_args()
    discussion = HERE / "routing_discussion.md"
    if args.report_only:
        results = json.loads((args.out / "routing.json").read_text())
        write_report(results, args.out, discussion.read_text() if discussion.exists() else "")
        return
    VARIANTS[:] = args.variants.split(",")
    UNPADDED_VARIANTS[:] = args.unpadded.split(",") if args.unpadded else []
    DIAGNOSE[:] = args.diagnose.split(",") if args.diagnose else []
    if VARIANTS[0] != "faithful":
        ap.error("--variants must start with faithful (the reference of 'gap closed')")
    log, elapsed = report.start(args.threads)

    results = {
        **report.provenance("benchmarks/quality/routing.py"),
        "router_rank": args.router_rank,
        "expert_rank": args.expert_rank,
        "top_k": args.top_k,
        "sets": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.sets.split(","):
        results["sets"][kind] = run_set(kind, args, log)
        results["seconds"] = elapsed()
        (args.out / "routing.json").write_text(json.dumps(results, indent=1))
        write_report(results, args.out, discussion.read_text() if discussion.exists() else "")
    log(f"done in {results['seconds']}s -> {args.out / 'routing.md'}")


if __name__ == "__main__":
    main()
