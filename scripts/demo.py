"""The bundled tiny default, end to end: the README's first command.

    python scripts/demo.py [--out smile-demo/model] [--cache DIR] [--examples 100] [--routing MODE] [--workers 2]

1. Trains (first run: a few minutes on 2 cores) or reuses a tiny character-level Llama base and four experts
   fully fine-tuned on synthetic tasks (string reversal, sorting, mirrored digits, digit extraction), cached in
   .cache/tiny-experts at the top of the repository (git-ignored; SMILE_TINY_CACHE or --cache move it). The task
   is recognisable only from the prompt's format: no task-id token.
2. Runs the real `smile upscale` on them (the commands are printed), twice: with the tool's default routing
   (`--routing auto`, which picks `likelihood-prompt` for a decoder-only LM: one expert per prompt, the one the
   model is most confident under; README, Routing) and with `--routing faithful` (the paper's per-token router,
   what vLLM serves), for comparison (`--routing MODE` runs one mode instead). Each SMILE row is named after the
   routing its config.json records.
3. Scores base, each expert, a simple average of the experts, and the SMILE models on held-out prompts (exact
   match, greedy decoding), prints the per-task accuracy table, how much of the experts' accuracy each SMILE model
   keeps at what parameter cost, and where the models were written.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from tiny_experts import merging, models
from tiny_experts.evaluate import accuracy, count_params


def average_model(base: Path, experts: list[Path], out: Path) -> Path:
    """The simple average of the experts (the plain merge SMILE is compared with), saved to out."""
    if not (out / "model.safetensors").exists():
        model = models.load(base)
        merged = merging.simple_average(model.state_dict(), [models.load(e).state_dict() for e in experts])
        model.load_state_dict(merged)
        model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("smile-demo") / "model")
    parser.add_argument("--cache", type=Path, default=models.DEFAULT_CACHE, help="where the trained models are kept")
    parser.add_argument("--router-rank", default="8")
    parser.add_argument("--expert-rank", default="16")
    parser.add_argument("--top-k", default="1")
    parser.add_argument("--routing", help="one smile upscale --routing mode (default: the default and faithful)")
    parser.add_argument("--examples", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--workers", type=int, default=2, help="experts fine-tuned at once (one process each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core free
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    built = models.build_or_load(args.cache, "demo", workers=args.workers)
    tasks = built["tasks"]
    base, experts = built["base"], [built["experts"][t] for t in tasks]
    rows = {"base": base}
    rows |= {f"expert: {t}": folder for t, folder in zip(tasks, experts, strict=True)}
    rows["simple average"] = average_model(base, experts, args.out.parent / "average")
    smile_rows = []
    for routing in [args.routing] if args.routing else [None, "faithful"]:  # None: the default (auto)
        out = args.out if routing == args.routing else args.out.parent / routing
        command = [
            "smile", "upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out),
            "--router-rank", args.router_rank, "--expert-rank", args.expert_rank, "--top-k", args.top_k,
            *(["--routing", routing] if routing else []), "--svd", "exact", "--force", "--quiet",
        ]  # fmt: skip
        print("$ " + shlex.join(command), flush=True)
        subprocess.run([sys.executable, "-m", "smile_cli", *command[1:]], check=True)
        smile_rows.append(f"SMILE ({json.loads((out / 'config.json').read_text())['smile_routing']})")
        rows[smile_rows[-1]] = out
    _, test = models.held_out(tasks)
    examples = {t: test[t][: args.examples] for t in tasks}
    print(f"\nExact-match accuracy (%) on {args.examples} held-out prompts per task:\n")
    header = f"| {'model':<24} | " + " | ".join(f"{t:>7}" for t in tasks) + " |    mean | params |"
    print(header + "\n|---|" + "---:|" * (len(tasks) + 2))
    scores, params = {}, {}
    for name, folder in rows.items():
        model = models.load(folder)
        scores[name], params[name] = accuracy(model, examples), count_params(model)
        cells = " | ".join(f"{100 * scores[name][t]:7.1f}" for t in tasks)
        mean = 100 * sum(scores[name].values()) / len(tasks)
        print(f"| {name:<24} | {cells} | {mean:7.1f} | {params[name] / params['base']:5.2f}x |", flush=True)
    print()
    for name in smile_rows:
        print(retention_line(name, scores, params, tasks))
    folders = ", ".join(str(rows[name]) for name in smile_rows)
    print(f"\nSMILE models written to {folders} ({time.perf_counter() - started:.0f} s in all).")
    print(f"Load it: AutoModelForCausalLM.from_pretrained('{args.out}', trust_remote_code=True)")
    print(f"See its routing: smile route {args.out} --prompt 'kqzpe>' --prompt 'k3m9pq2.'")


def retention_line(name: str, scores: dict, params: dict, tasks: list[str]) -> str:
    """How much of the experts' accuracy SMILE keeps (per task: SMILE's accuracy over the task's own expert's,
    averaged), and its parameters against the base's and against keeping every expert."""
    kept = [scores[name][t] / scores[f"expert: {t}"][t] for t in tasks if scores[f"expert: {t}"][t] > 0]
    share = 100 * sum(kept) / len(kept) if kept else 0.0
    smile, base = params[name], params["base"]
    return (
        f"{name} keeps {share:.0f}% of the experts' accuracy on their own tasks, in one model of {smile:,} parameters: "
        f"{smile / base:.2f}x the base, {100 * smile / (len(tasks) * base):.0f}% of keeping the {len(tasks)} experts."
    )


if __name__ == "__main__":
    main()
