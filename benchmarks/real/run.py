"""The real-model table: SMILE against mergekit on SmolLM2-135M-Instruct and its LoRA experts (build.py).

Every case is built (timed, peak RSS of the building process and its children), then scored with lm-eval 0.4.13
on the generated local task files (tasks.py: greedy, exact match of the first line, through the chat template),
and its generation speed is measured against the base in the same process. Cases run in priority order and the
results file is rewritten after each, so an interrupted run keeps what it measured; a case that fails records its
error verbatim.

  python benchmarks/real/run.py [--cases NAME,...] [--limit N] [--out docs/results/real.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as B  # noqa: E402
import tasks as T  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/venvs/mergekit"))
ROUTINGS = ("faithful", "prompt-model", "spectral-prompt", "combined-prompt")
# Run as a parent of the measured command: its children's peak RSS, in the line tests/peak_rss.py reads back.
PEAK_OF_CHILD = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('SMILE_PEAK_RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def measured(command: list[str]) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from peak_rss import measured_run

    result = measured_run([sys.executable, "-c", PEAK_OF_CHILD, *command])
    if result["rc"] != 0:
        raise RuntimeError(f"{command[0]} exited {result['rc']}: {result['stderr'].strip().splitlines()[-1:]}")
    return {"build_wall_s": result["wall_s"], "build_peak_rss_bytes": result["peak_rss_bytes"]}


def out_dir(root: Path) -> Path:
    """Where the built models go: $SMILE_REAL_OUT (so that runs of several checkouts do not share builds), else
    the model cache's out/."""
    return Path(os.environ.get("SMILE_REAL_OUT") or root / "out").expanduser()


def smile_build(root: Path, source: str, rank: int, tag: str = "") -> tuple[Path, dict]:
    """smile upscale of the three experts (LoRA adapter folders or merged checkpoints), router rank 8, with this
    checkout's modeling file (into OUT/TAGsmile-SOURCE-rRANK: --tag keeps one checkout's builds apart)."""
    out = out_dir(root) / f"{tag}smile-{source}-r{rank}"
    record = out.parent / f"{out.name}.build.json"
    if os.environ.get("SMILE_REAL_REUSE") and record.exists() and (out / "config.json").exists():
        return out, json.loads(record.read_text())  # measured when it was built
    experts = ",".join(str(root / f"expert-{t}" / source) for t in T.TASKS)
    cmd = [sys.executable, "-m", "smile_cli", "upscale", "--base", str(root / "base"), "--experts", experts]
    cmd += ["--out", str(out), "--router-rank", "8", "--expert-rank", str(rank), "--force", "--quiet"]
    info = measured(cmd)
    record.write_text(json.dumps(info) + "\n")
    return out, info


CALIBRATION_PROMPTS = 8  # train prompts per task for --calibrate (issue 22 item 3)


def smile_calibrated_build(root: Path, source: str, rank: int, tag: str = "") -> tuple[Path, dict]:
    """smile upscale --calibrate: routers fitted to CALIBRATION_PROMPTS train prompts per task, each wrapped in the
    chat template as the experts were trained and as lm-eval scores them; routing auto (= calibrated)."""
    out = out_dir(root) / f"{tag}smile-{source}-r{rank}-calibrated"
    experts = [str(root / f"expert-{t}" / source) for t in T.TASKS]
    prompts = {
        e: [p for p, _ in T.examples(t, "train", CALIBRATION_PROMPTS)] for e, t in zip(experts, T.TASKS, strict=True)
    }
    calibration = out.parent / f"{out.name}.yaml"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    calibration.write_text(json.dumps({"prompts": prompts, "chat_template": True}, indent=1) + "\n")
    cmd = [sys.executable, "-m", "smile_cli", "upscale", "--base", str(root / "base"), "--experts", ",".join(experts)]
    cmd += ["--out", str(out), "--router-rank", "8", "--expert-rank", str(rank), "--calibrate", str(calibration)]
    info = measured([*cmd, "--force", "--quiet"])
    manifest = json.loads((out / "smile_manifest.json").read_text())
    info["calibration"] = {k: manifest["calibration_fit"][k] for k in ("overall", "layers", "methods", "tokens")}
    return out, info


def mergekit_build(root: Path, name: str, yaml_text: str, moe: bool = False) -> tuple[Path, dict]:
    out = out_dir(root) / f"mergekit-{name}"
    config = out_dir(root) / f"mergekit-{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml_text)
    tool = MERGEKIT_VENV / "bin" / ("mergekit-moe" if moe else "mergekit-yaml")
    if not tool.exists():
        raise RuntimeError(f"{tool} missing: run benchmarks/real/venvs.sh")
    extra = ["--random-seed", "0", "--i-understand-this-is-not-useful-without-training"] if "random" in name else []
    info = measured([str(tool), str(config), str(out), "--copy-tokenizer", "--allow-crimes", "--lazy-unpickle", *extra])
    return out, info


def merge_yaml(root: Path, method: str) -> str:
    experts = [root / f"expert-{t}" / "merged" for t in T.TASKS]
    if method == "linear":
        models = "".join(f"  - model: {e}\n    parameters:\n      weight: 1.0\n" for e in experts)
        return f"merge_method: linear\nmodels:\n{models}parameters:\n  normalize: true\ndtype: float32\n"
    params = "      weight: 1.0\n" + ("      density: 0.5\n" if method == "ties" else "")
    models = "".join(f"  - model: {e}\n    parameters:\n{params}" for e in experts)
    return f"merge_method: {method}\nbase_model: {root / 'base'}\nmodels:\n{models}dtype: float32\n"


def moe_yaml(root: Path, gate_mode: str, prompts_per_expert: int = 3) -> str:
    lines = [f"base_model: {root / 'base'}", f"gate_mode: {gate_mode}", "dtype: float32", "experts_per_token: 1"]
    lines.append("experts:")
    for t in T.TASKS:
        lines.append(f"  - source_model: {root / f'expert-{t}' / 'merged'}")
        lines.append("    positive_prompts:")
        for prompt, _ in T.examples(t, "gate", prompts_per_expert):
            lines.append(f"      - {json.dumps(prompt)}")
    return "\n".join(lines) + "\n"


def load(folder: Path, routing: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": torch.float32}
    if (folder / "modeling_smile.py").exists():
        kwargs["trust_remote_code"] = True
        if routing:
            kwargs["smile_routing"] = routing
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code="trust_remote_code" in kwargs)
    return model, tok


def lm_eval_scores(model, tok, task_dir: Path, limit: int | None, batch: int, tasks=T.TASKS) -> dict:
    """Exact match per task (of `tasks`) with lm-eval's own pipeline (HFLM on the loaded model, chat template
    applied)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    names = [f"real_{t}" for t in tasks]
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=True,
        limit=limit,
        log_samples=False,
    )
    return {t: float(result["results"][f"real_{t}"]["exact_match,first_line"]) for t in tasks}


@torch.no_grad()
def tokens_per_second(model, tok, new_tokens: int = 16, repeats: int = 2) -> float:
    """Greedy generation of a fixed batch (4 prompts, one per task and one more, exactly new_tokens each), best of
    repeats."""
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [T.examples(t, "dev", 2)[i][0] for t in T.TASKS for i in range(1)] + [T.examples("units", "dev", 2)[1][0]]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        best = min(best, time.perf_counter() - start)
    return len(prompts) * new_tokens / best


class OracleHook:
    """Routing hook that sends every token of a batch row to the expert of the row's task (set per request)."""

    def __init__(self):
        self.expert = None

    def __call__(self, name, weights):
        if self.expert is None:
            return None
        forced = torch.zeros_like(weights)
        forced[..., self.expert] = 1.0
        return forced


def oracle_scores(model, tok, task_dir: Path, limit, batch, tasks=T.TASKS) -> dict:
    """Oracle routing: each task scored separately with the hook forcing that task's expert."""
    hook = OracleHook()
    handle = model.register_routing_hook(hook)
    scores = {}
    try:
        for t in tasks:
            hook.expert = T.TASKS.index(t)
            scores[t] = lm_eval_scores(model, tok, task_dir, limit, batch, (t,))[t]
    finally:
        handle.remove()
    return scores


def newer_routings() -> tuple[str, ...]:
    """The modeling file's routing modes beyond ROUTINGS (rows of the adapters' rank-16 build only)."""
    from smile_cli.modeling.modeling_smile import ROUTING_MODES

    return tuple(m for m in ROUTING_MODES if m not in ROUTINGS and not m.startswith("calibrated"))  # own build


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cases(root: Path, tag: str = "") -> list[tuple[str, callable]]:
    """(name, builder) in priority order; a builder returns (folder, build info, routing or None, oracle)."""
    out = []
    out.append(("base", lambda: (root / "base", {}, None, False)))
    for t in T.TASKS:
        out.append((f"expert-{t}", lambda t=t: (root / f"expert-{t}" / "merged", {}, None, False)))
    built = {}

    def smile(source, rank, routing, oracle=False):
        def make():
            if (source, rank) not in built:
                built[(source, rank)] = smile_build(root, source, rank, tag)
                first = True
            else:
                first = False
            folder, info = built[(source, rank)]
            return (
                folder,
                (info if first else {"build_shared_with": f"smile-{source}-r{rank} (same weights)"}),
                (routing),
                oracle,
            )

        return make

    for routing in ("faithful", "prompt-model"):
        out.append((f"smile-adapter-r16-{routing}", smile("adapter", 16, routing)))
    out.append(("smile-adapter-r16-oracle", smile("adapter", 16, "faithful", oracle=True)))
    for method in ("linear", "task_arithmetic", "ties"):
        out.append((f"mergekit-{method}", lambda m=method: (*mergekit_build(root, m, merge_yaml(root, m)), None, 0)))
    for gate in ("hidden", "random"):
        out.append(
            (
                f"mergekit-moe-{gate}",
                lambda g=gate: (*mergekit_build(root, f"moe-{g}", moe_yaml(root, g), True), None, 0),
            )
        )
    calibrated = lambda: smile_calibrated_build(root, "adapter", 16, tag)  # noqa: E731
    out.append(("smile-adapter-r16-calibrated", lambda: (*calibrated(), None, False)))
    # its routers pooled per prompt (the folder built by the row above)
    folder = out_dir(root) / f"{tag}smile-adapter-r16-calibrated"
    shared = {"build_shared_with": folder.name}
    out.append(("smile-adapter-r16-calibrated-prompt", lambda: (folder, shared, "calibrated-prompt", False)))
    for routing in ("spectral-prompt", "combined-prompt", *newer_routings()):
        out.append((f"smile-adapter-r16-{routing}", smile("adapter", 16, routing)))
    for routing in ROUTINGS:
        out.append((f"smile-adapter-r64-{routing}", smile("adapter", 64, routing)))
    out.append(("smile-adapter-r64-oracle", smile("adapter", 64, "faithful", oracle=True)))
    for rank in (16, 64):
        for routing in ROUTINGS:
            out.append((f"smile-merged-r{rank}-{routing}", smile("merged", rank, routing)))
        out.append((f"smile-merged-r{rank}-oracle", smile("merged", rank, "faithful", oracle=True)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all, in priority order)")
    ap.add_argument("--limit", type=int, default=None, help="prompts per task (default: all of the test split)")
    ap.add_argument("--test", type=int, default=40, help="size of the generated test split per task")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "real.json")
    ap.add_argument("--tag", default="", help="prefix of this run's SMILE builds and task files under the cache's out/")
    ap.add_argument(
        "--tasks",
        default=",".join(T.TASKS),
        help="tasks to score (default: all); the row keeps the other tasks' scores from the results file",
    )
    ap.add_argument("--skip-speed", action="store_true", help="keep the row's tokens/s from the results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = B.cache_dir()
    if not B._done(root / "base"):
        raise SystemExit(f"no base under {root}: run benchmarks/real/build.py first")
    # not the earlier JSON-lines task files' folder (lm-eval-tasks), which a checkout before the fix rewrites
    task_dir = out_dir(root) / f"{args.tag}lm-eval-tasks-parquet" if args.tag else root / "lm-eval-tasks-parquet"
    T.write_lm_eval_tasks(task_dir, args.test)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"cases": {}}
    results["machine"] = {"nproc": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}
    results["experts"] = {
        t: json.loads((root / f"expert-{t}" / "DONE").read_text()) for t in T.TASKS if B._done(root / f"expert-{t}")
    }
    wanted = set(filter(None, args.cases.split(",")))
    tasks = tuple(t for t in T.TASKS if t in args.tasks.split(","))
    partial = tasks != T.TASKS or args.skip_speed
    base_model, base_tok = load(root / "base")
    for name, make in cases(root, args.tag):
        if wanted and name not in wanted:
            continue
        started = time.time()
        earlier = results["cases"].get(name, {})
        row = {"load_avg_start": os.getloadavg()[0]}
        if partial:  # what is not measured again: as the results file has it
            row.update({k: v for k, v in earlier.items() if k not in ("error", "load_avg_start", "seconds")})
            row["measured_now"] = {"tasks": list(tasks), "speed": not args.skip_speed}
        try:
            folder, info, routing, oracle = make()
            if partial and earlier:  # the build as measured before; this run's beside it
                row["build_now"] = info
            else:
                row.update(info)
            model, tok = load(folder, routing)
            row["params"] = params(model)
            scores = (oracle_scores if oracle else lm_eval_scores)(model, tok, task_dir, args.limit, args.batch, tasks)
            row["accuracy"] = {**earlier.get("accuracy", {}), **scores} if partial else scores
            if not args.skip_speed:
                tps, base_tps = tokens_per_second(model, tok), tokens_per_second(base_model, base_tok)
                row.update({"tokens_per_s": round(tps, 1), "base_tokens_per_s": round(base_tps, 1)})
                row["speed_vs_base"] = round(tps / base_tps, 3)
            del model
        except Exception as error:  # recorded verbatim in the table
            row["error"] = f"{type(error).__name__}: {error}"
        row["seconds"] = round(time.time() - started, 1)
        results["cases"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
