"""The hard routing set (issue 22): tasks over one alphabet told apart only by a cue word, and mixed prompts.

    python benchmarks/quality/routing_hard.py [--threads 1] [--sets full,lora] [--router-rank 8] [--expert-rank 16]
        [--modes faithful,prompt-model,...] [--report-only]

benchmarks/quality's own set (routing.py) is easy for a prompt router: each task has its own characters and
separators, so the prompt's first tokens name the task. Here three tasks (of tiny_experts.tasks.CUED_OPS: flip,
roll, swap) read the same lowercase strings in the same format; only a four-letter cue word says which
operation to apply, at the start of the prompt ("flip:kqzpe=") or after the string ("kqzpe:flip="). Mixed prompts
hold two sub-problems of different tasks, answers joined ("flip:abc;roll:xyz=" -> "cba;yzx"); each expert was
trained on its task's two formats (cue at start, cue later), never on two sub-problems in one prompt.

Models: the demo preset's cached base (hidden 128, 4 layers) and three full and three LoRA experts fine-tuned on
the cued tasks (tiny.build_or_load with tasks=CUED; trained once, cached in --cache). For each kept routing mode:
`smile upscale --routing MODE` (routing.upscale), loaded with trust_remote_code, exact match with greedy decoding
and the KV cache (batched, left padding). Beside them two oracles on the faithful model, through
model.register_routing_hook: per token (every position forced to the expert of the sub-problem whose token it
predicts, the answers' own tokens included), and, for mixed prompts, each sub-problem encoded on its own (its own
prompt, its own expert forced, answers joined). Writes docs/results/routing_hard.md and routing_hard.json.
"""

import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]  # tiny_experts: scripts/

import evaluate as E  # noqa: E402
import report  # noqa: E402
import routing as R  # noqa: E402
import routing_variants as RV  # noqa: E402
import torch  # noqa: E402

from tiny_experts import models as tiny  # noqa: E402
from tiny_experts import tasks as T  # noqa: E402
from tiny_experts.evaluate import _left_pad, generate  # noqa: E402

CUED = ["flip", "roll", "swap"]  # of T.CUED_OPS
PRESET = "demo"  # the default base (--preset): the demo's (hidden 128, 4 layers)
SETTINGS = dict(tasks=CUED, finetune_steps=1000, lora_steps=600)  # the experts' (part of their cache key)
MAX_NEW = T.CUED_MAX_ANSWER_LEN + 1
MIXED_PER_PAIR = 32  # mixed test prompts per ordered pair of different tasks (6 pairs)
DOUBLES = 50  # test prompts per task with two sub-problems of that task
SINGLE = ("start", "later")
FORMATS = (*SINGLE, "double")  # the experts' own accuracy is measured on these


def format_of(prompt: str) -> str:
    if ";" in prompt:
        return "double"
    return "start" if prompt.split(":")[0] in T.CUED_OPS else "later"


def _strings(prompt: str) -> list[str]:
    return [part.split(":")[0 if format_of(prompt) == "later" else 1] for part in prompt[:-1].split(";")]


def _unambiguous(prompt: str) -> bool:
    """Every string of 3 letters or more: on 2 letters flip, roll and swap give the same answer (any expert is
    right), so those prompts (trained on) are left out of every test set."""
    return all(len(s) >= 3 for s in _strings(prompt))


def _draw(rng, n, task, fmt, other=None):
    out = []
    while len(out) < n:
        pair = T.cued_example(rng, task, fmt, other)
        out += [pair] if _unambiguous(pair[0]) else []
    return out


def test_sets(names) -> dict:
    """{"start"|"later": {task: pairs}} from the held-out test split (excluded from training), "double":
    {task: pairs} and "mixed": {"a+b": pairs} (never trained on); unambiguous prompts only."""
    _, test = tiny.held_out(names)
    sets = {
        f: {t: [(p, a) for p, a in test[t] if format_of(p) == f and _unambiguous(p)] for t in names}
        for f in T.CUED_FORMATS
    }
    rng = random.Random("cued-mixed-test")
    sets["double"] = {t: _draw(rng, DOUBLES, t, "double") for t in names}
    sets["mixed"] = {f"{a}+{b}": _draw(rng, MIXED_PER_PAIR, a, "mixed", b) for a in names for b in names if a != b}
    return sets


def segments(prompt: str, text: str, a: int, b: int) -> list[int]:
    """The expert forced at each position of BOS + prompt + text for the mixed prompt of experts (a, b): the
    expert of the sub-problem whose token the position predicts (first sub-problem with its ';', second with
    '='; first answer with its ';', then the second answer and EOS)."""
    cut = prompt.index(";") + 1
    semi = text.find(";")
    first_answer = len(prompt) + (semi + 1 if semi >= 0 else len(text) + 1)
    out = []
    for pos in range(1 + len(prompt) + len(text)):  # position pos predicts character pos of prompt + text
        out.append(a if pos < cut or len(prompt) <= pos < first_answer else b)
    return out


@torch.inference_mode()
def forced_generate(model, prompts, experts_at, max_new=MAX_NEW) -> list[str]:
    """Greedy completions with routing forced at every position: experts_at(i, text) gives the expert of each
    position of BOS + prompts[i] + text (text: generated so far), or None for the model's own routing. Decodes
    without a KV cache (the whole sequence each step), so every position's forced expert is known."""
    ids, mask = _left_pad(prompts)
    width = ids.shape[1]
    forced = None

    def hook(name, w):
        return None if forced is None else forced.to(w)

    handle = model.register_routing_hook(hook)
    try:
        for _ in range(max_new):
            texts = [T.decode(row[width:]) for row in ids]
            rows = [experts_at(i, texts[i]) for i in range(len(prompts))]
            forced = None
            if rows[0] is not None:
                n = model.config.num_local_experts
                forced = torch.zeros(ids.shape[0], ids.shape[1], n)
                for i, experts in enumerate(rows):
                    real = int(mask[i].sum())  # BOS + prompt + every generated token (after EOS: the last expert)
                    experts = (experts + experts[-1:] * real)[:real]
                    forced[i, ids.shape[1] - real :] = torch.nn.functional.one_hot(torch.tensor(experts), n).float()
            position = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if all((row[width:] == T.EOS).any() for row in ids):
                break
    finally:
        handle.remove()
    return [T.decode(row[width:]) for row in ids]


def share(preds, pairs) -> float:
    return sum(p == a for p, (_, a) in zip(preds, pairs, strict=True)) / len(pairs)


def oracle_mixed(model, mixed, expert_of) -> dict:
    """Per ordered pair: exact match of the per-token oracle and of each sub-problem encoded on its own."""
    token, alone = {}, {}
    for pair, pairs in mixed.items():
        a, b = (expert_of[t] for t in pair.split("+"))
        prompts = [p for p, _ in pairs]
        preds = forced_generate(model, prompts, lambda i, text, a=a, b=b, P=prompts: segments(P[i], text, a, b))
        token[pair] = share(preds, pairs)
        parts = [[p.split(";")[k] + ("=" if k == 0 else "") for p in prompts] for k in (0, 1)]
        answers = []
        for k, e in ((0, a), (1, b)):
            answers.append(
                forced_generate(model, parts[k], lambda i, text, e=e, P=parts[k]: [e] * (1 + len(P[i]) + len(text)))
            )
        alone[pair] = share([f"{x};{y}" for x, y in zip(*answers, strict=True)], pairs)
    return {"per_token": token, "parts_alone": alone}


def likelihood(model, examples, expert_of, max_new=MAX_NEW) -> dict:
    """routing_variants' expert-likelihood posterior: {"test": {key: exact match}, "picked_own": {key: share of
    prompts whose most likely expert is the key's (first) task's}} (each key's prompts decoded as one batch)."""
    test, picked = {}, {}
    for key, pairs in examples.items():
        prompts = [p for p, _ in pairs]
        experts = RV.likelihood_experts(model, *_left_pad(prompts))
        with RV.forced_rows(model, experts):
            test[key] = share(generate(model, prompts, max_new_tokens=max_new), pairs)
        picked[key] = (experts == expert_of[key.split("+")[0]]).float().mean().item()
    return {"test": test, "picked_own": picked}


def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def run_set(kind, args, log) -> dict:
    models = tiny.build_or_load(args.cache, args.preset, lora=(kind == "lora"), log=log, **SETTINGS)
    names = models["tasks"]
    expert_of = {t: i for i, t in enumerate(names)}
    sets = test_sets(names)
    own = {f: {} for f in FORMATS}
    for t, folder in models["experts"].items():
        expert = tiny.load(folder)
        for f in FORMATS:
            own[f][t] = E.accuracy(expert, {t: sets[f][t]}, MAX_NEW)[t]
    log(f"[{kind}] experts on their own tasks: {own}")
    res = {
        "tasks": names,
        "n": {f: {t: len(v) for t, v in sets[f].items()} for f in sets},
        "expert_own": own,
        "train_seconds": models["train_seconds"],
        "modes": {},
    }
    out = args.cache / "smile-tmp" / f"routing-hard-{kind}"
    for mode in args.modes.split(","):
        t0 = time.time()
        R.upscale(models["base"], list(models["experts"].values()), out, args.router_rank, args.expert_rank,
                  args.top_k, mode)  # fmt: skip
        assert json.loads((out / "config.json").read_text())["smile_routing"] == mode
        model = tiny.load(out)
        entry = {}
        for f in SINGLE:
            acc = E.accuracy(model, sets[f], MAX_NEW)
            routing = R.routing_by_segment(model, {t: v[:40] for t, v in sets[f].items()}, expert_of)
            entry[f] = dict(test=acc, norm=R.normalised(acc, own[f]), routing_prompt=R.mean_routing(routing, "prompt"),
                            routing_answer=R.mean_routing(routing, "answer"))  # fmt: skip
        entry["mixed"] = E.accuracy(model, sets["mixed"], MAX_NEW)
        res["modes"][mode] = entry
        log(
            f"[{kind}] {mode}: start {entry['start']['norm']:.3f} later {entry['later']['norm']:.3f} "
            f"mixed {mean(entry['mixed']):.3f} ({time.time() - t0:.1f}s)"
        )
        if mode == "faithful":
            t0 = time.time()
            oracle = {}
            for f in SINGLE:
                acc = E.oracle_accuracy(model, sets[f], expert_of)
                oracle[f] = dict(test=acc, norm=R.normalised(acc, own[f]))
            oracle.update(oracle_mixed(model, sets["mixed"], expert_of))
            # the cache-free decoding loop of the oracles, unforced, against generate() on the same prompts
            check = [p for p, _ in sets["mixed"][f"{names[0]}+{names[1]}"]]
            loop = forced_generate(model, check, lambda i, text: None)
            oracle["loop_differs"] = sum(
                x != y for x, y in zip(loop, generate(model, check, max_new_tokens=MAX_NEW), strict=True)
            )
            res["oracle"] = oracle
            if args.likelihood:
                t0 = time.time()
                entry = {f: likelihood(model, sets[f], expert_of) for f in SINGLE}
                for f in SINGLE:
                    entry[f]["norm"] = R.normalised(entry[f]["test"], own[f])
                entry["mixed"] = likelihood(model, sets["mixed"], expert_of)
                res["likelihood"] = entry
                log(
                    f"[{kind}] expert-likelihood: start {entry['start']['norm']:.3f} later {entry['later']['norm']:.3f}"
                    f" mixed {mean(entry['mixed']['test']):.3f} ({time.time() - t0:.1f}s)"
                )
            log(
                f"[{kind}] oracle: start {oracle['start']['norm']:.3f} later {oracle['later']['norm']:.3f} mixed per "
                f"token {mean(oracle['per_token']):.3f} parts alone {mean(oracle['parts_alone']):.3f} "
                f"(loop differs {oracle['loop_differs']}/{len(check)}; {time.time() - t0:.1f}s)"
            )
    return res


def _pct(x):
    return f"{100 * x:.1f}"


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Hard routing set: tasks told apart only by a cue word, and mixed prompts (issue 22)",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results['seconds']:.0f} s (cached models){results.get('load', '')}  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/routing_hard.py` (its docstring has the setup); raw numbers in "
        "`routing_hard.json`. Three tasks over the same lowercase strings (2-5 letters; the test prompts: 3-5, "
        "since on 2 letters the three operations agree) and format, told apart "
        "only by a four-letter cue word: flip (reverse), roll (rotate left by one), swap (swap adjacent pairs). "
        "cue at start: `flip:kqzpe=` -> `epzqk`; cue later: `kqzpe:flip=`; mixed: two "
        "sub-problems of different tasks (2-3 letters each), answers joined by ';' (`flip:abc;roll:xyz=` -> "
        f"`cba;yzx`, {MIXED_PER_PAIR} prompts for each of the 6 ordered pairs); double: two sub-problems of the "
        "same task. Base: the demo preset's (tiny Llama, hidden "
        "128, 4 layers, character vocabulary); each expert fine-tuned on its own task's two single formats (cue at "
        "start, cue later), never on two sub-problems in one prompt (double and mixed are out of its training). "
        "Every SMILE model: `smile upscale "
        f"--router-rank {results['router_rank']} --expert-rank {results['expert_rank']} --top-k {results['top_k']} "
        "--routing MODE --dtype float32`, greedy decoding with the KV cache (batched, left padding). Single-task "
        "columns: normalised exact match (accuracy on task t / expert t's own accuracy on that format, averaged "
        "over tasks); mixed: exact match of the joined answer (both halves right), averaged over pairs. Routing "
        "acc: share of prompt tokens whose top expert is the task's own (teacher forced, 40 prompts per task, "
        "averaged over the 28 SmileLinears; chance 33%). Oracles, through model.register_routing_hook on the "
        "faithful model: per token = every position forced to the expert of the sub-problem whose token it "
        "predicts; parts alone = each sub-problem of a mixed prompt as its own prompt with its own expert, answers "
        "joined. expert-likelihood (benchmark-only, `routing_variants.likelihood_experts`, with --likelihood): each "
        "prompt scored under each expert forced on every token (sum of the prompt's next-token log-likelihoods), "
        "the most likely expert forced on the whole sequence; its routing columns give the share of prompts whose "
        "picked expert is the task's own (mixed: the first sub-problem's).",
        "",
    ]
    for kind, res in results["sets"].items():
        tasks = res["tasks"]
        lines += [f"## {'Full fine-tuned' if kind == 'full' else 'LoRA'} experts", ""]
        lines += [
            "Experts on their own task (exact match, %; test prompts per task: "
            + ", ".join(f"{f} {min(res['n'][f].values())}-{max(res['n'][f].values())}" for f in FORMATS)
            + f"; mixed: {MIXED_PER_PAIR} per pair):",
            "",
            "| format | " + " | ".join(tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for f in FORMATS:
            lines.append(f"| {f} | " + " | ".join(_pct(res["expert_own"][f][t]) for t in tasks) + " |")
        lines += [
            "",
            "| routing | cue at start (norm.) | cue later (norm.) | mixed (exact) | routing acc prompt, start | "
            "routing acc prompt, later | "
            + " | ".join(f"start {t}" for t in tasks)
            + " | "
            + " | ".join(f"later {t}" for t in tasks)
            + " |",
            "|---|" + "---:|" * (5 + 2 * len(tasks)),
        ]
        for mode, e in res["modes"].items():
            lines.append(
                f"| {mode} | {_pct(e['start']['norm'])} | {_pct(e['later']['norm'])} | {_pct(mean(e['mixed']))} | "
                f"{_pct(e['start']['routing_prompt'])} | {_pct(e['later']['routing_prompt'])} | "
                + " | ".join(_pct(e["start"]["test"][t]) for t in tasks)
                + " | "
                + " | ".join(_pct(e["later"]["test"][t]) for t in tasks)
                + " |"
            )
        lk = res.get("likelihood")
        if lk:
            lines.append(
                f"| expert-likelihood (benchmark) | {_pct(lk['start']['norm'])} | {_pct(lk['later']['norm'])} | "
                f"{_pct(mean(lk['mixed']['test']))} | {_pct(mean(lk['start']['picked_own']))} (picked) | "
                f"{_pct(mean(lk['later']['picked_own']))} (picked) | "
                + " | ".join(_pct(lk["start"]["test"][t]) for t in tasks)
                + " | "
                + " | ".join(_pct(lk["later"]["test"][t]) for t in tasks)
                + " |"
            )
        o = res.get("oracle")
        if o:
            for label, key in (("oracle per token", "per_token"), ("oracle, parts alone", "parts_alone")):
                single = key == "per_token"
                lines.append(
                    f"| {label} | {_pct(o['start']['norm']) if single else '-'} | "
                    f"{_pct(o['later']['norm']) if single else '-'} | {_pct(mean(o[key]))} | 100.0 | 100.0 | "
                    + " | ".join(_pct(o["start"]["test"][t]) if single else "" for t in tasks)
                    + " | "
                    + " | ".join(_pct(o["later"]["test"][t]) if single else "" for t in tasks)
                    + " |"
                )
        pairs = list(next(iter(res["modes"].values()))["mixed"])
        lines += ["", "Mixed prompts, exact match (%) per ordered pair (first task + second task):", ""]
        lines += ["| routing | " + " | ".join(pairs) + " |", "|---|" + "---:|" * len(pairs)]
        for mode, e in res["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(_pct(e["mixed"][p]) for p in pairs) + " |")
        if lk:
            cells = " | ".join(_pct(lk["mixed"]["test"][p]) for p in pairs)
            lines.append(f"| expert-likelihood (benchmark) | {cells} |")
        if o:
            for label, key in (("oracle per token", "per_token"), ("oracle, parts alone", "parts_alone")):
                lines.append(f"| {label} | " + " | ".join(_pct(o[key][p]) for p in pairs) + " |")
            lines += [
                "",
                f"Check of the oracles' cache-free decoding loop: unforced, it gives {o['loop_differs']} completion(s) "
                f"different from generate() with the KV cache on the {MIXED_PER_PAIR} mixed prompts of the first pair.",
            ]
        lines.append("")
    easy = results.get("easy")
    if easy:
        lines += [
            "## Easy set: the expert-likelihood posterior beside faithful and prompt-model",
            "",
            f"`{easy['command']}` ({easy['seconds']:.0f} s): the demo's cached full experts "
            f"({', '.join(easy['tasks'])}; "
            "each task its own characters and separators), the same ranks, normalised exact match on 150 held-out "
            "test prompts per task. (benchmarks/quality's own bench set was not in this machine's cache.)",
            "",
            "| routing | normalised |",
            "|---|---:|",
            *(
                f"| {m} | {_pct(easy[m])} |"
                for m in easy.get("modes", ("faithful", "prompt-model", "expert-likelihood", "oracle"))
            ),
            "",
            "expert-likelihood picked the task's own expert for "
            + ", ".join(f"{t} {_pct(v)}%" for t, v in easy["expert-likelihood picked own"].items())
            + " of the prompts.",
            "",
        ]
    discussion = HERE / "routing_hard_discussion.md"
    if discussion.exists():
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    (out / "routing_hard.md").write_text("\n".join(lines) + "\n")


def easy(args) -> None:
    """The expert-likelihood posterior beside faithful and prompt-model on an easy set: the demo's cached experts
    (tiny.DEFAULT_CACHE / SMILE_TINY_CACHE: reverse, sort, mirror, extract; each task its own format), full
    fine-tunes, the same ranks; normalised exact match on the held-out test prompts. Prints one JSON line."""
    log, elapsed = report.start(args.threads)
    models = tiny.build_or_load(tiny.DEFAULT_CACHE, "demo", log=log)
    names = models["tasks"]
    expert_of = {t: i for i, t in enumerate(names)}
    _, test = tiny.held_out(names)
    own = {t: E.accuracy(tiny.load(f), {t: test[t]})[t] for t, f in models["experts"].items()}
    out, res = args.cache / "smile-tmp" / "routing-hard-easy", {"tasks": names, "expert_own": own}
    modes = [m for m in args.modes.split(",") if m != "faithful"] + ["faithful"]  # faithful last: the oracle's
    for mode in modes:
        R.upscale(models["base"], list(models["experts"].values()), out, args.router_rank, args.expert_rank,
                  args.top_k, mode)  # fmt: skip
        model = tiny.load(out)
        res[mode] = R.normalised(E.accuracy(model, test), own)
    lk = likelihood(model, test, expert_of, T.MAX_ANSWER_LEN + 1)
    res["expert-likelihood"] = R.normalised(lk["test"], own)
    res["expert-likelihood picked own"] = lk["picked_own"]
    res["oracle"] = R.normalised(E.oracle_accuracy(model, test, expert_of), own)
    res["modes"] = [*modes, "expert-likelihood", "oracle"]
    res["seconds"] = elapsed()
    print(json.dumps({**report.provenance("benchmarks/quality/routing_hard.py"), **res}))


def main():
    ap = report.parser(__doc__)
    ap.set_defaults(preset=PRESET)
    ap.add_argument("--sets", default="full,lora")
    ap.add_argument("--router-rank", type=int, default=8)
    ap.add_argument("--expert-rank", default="16")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--modes", default=",".join(R.KEPT), help="kept routing modes; faithful first (the oracles')")
    ap.add_argument("--likelihood", action="store_true", help="also routing_variants' expert-likelihood posterior")
    ap.add_argument("--easy", action="store_true", help="faithful, prompt-model and expert-likelihood on the demo set")
    ap.add_argument("--report-only", action="store_true", help="rewrite routing_hard.md from routing_hard.json")
    args = ap.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / "routing_hard.json").read_text()), args.out)
        return
    if args.easy:
        return easy(args)
    if not args.modes.startswith("faithful"):
        ap.error("--modes must start with faithful (the oracles run on its model)")
    log, elapsed = report.start(args.threads)
    results = {
        **report.provenance("benchmarks/quality/routing_hard.py"),
        "router_rank": args.router_rank,
        "expert_rank": args.expert_rank,
        "top_k": args.top_k,
        "sets": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.sets.split(","):
        results["sets"][kind] = run_set(kind, args, log)
        results["seconds"] = elapsed()
        (args.out / "routing_hard.json").write_text(json.dumps(results, indent=1))
        write_report(results, args.out)
    log(f"done in {results['seconds']}s -> {args.out / 'routing_hard.md'}")


if __name__ == "__main__":
    main()
