"""Generation throughput in vLLM (CPU build, 0.32) of a SMILE model against its base, at a tiny and a mid-size shape.

For each shape: a random Llama base and three low-rank "fine-tunes" (tests/tiny_models.py), upscaled with the
default options (faithful routing, router rank 8, top-1, expert rank 128; 16 at the tiny shape, whose k_proj has
32 outputs). Then, in the vLLM venv (`python -m smile_cli.vllm_env`), one engine per model, all alive at once:
the base with vLLM's own Llama code ("base"), the base through vLLM's Transformers backend ("base-tf"), the SMILE
folder (which only that backend runs); a warm-up batch each, then --reps rounds of timed batches (the three in
turn, on the same prompts) of --batch prompts of --prompt-len random tokens, each generating --max-tokens tokens
(greedy, ignore_eos). Reported: generated tokens per second (median of the reps) with the 1-minute load average
before each rep (the machine may be shared), and the median of the per-round ratios. Engine starts are not timed.

  python benchmarks/vllm_throughput.py [--shapes tiny,mid] [--reps 5] [--batch 8] [--prompt-len 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2),
    "mid": dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4),
}
HEAD_DIM = {"tiny": 32, "mid": 64}
EXPERT_RANK = {"tiny": "16", "mid": "128"}


def engine(job_path: str) -> int:
    """Inside the vLLM venv: time the job's models, the two of a shape alive at once and their reps interleaved
    (base, SMILE, base, SMILE, ...: the machine's load falls on both alike); one JSON line per model on stdout."""
    import random

    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    for shape in dict.fromkeys(m["shape"] for m in job["models"]):
        models = [m for m in job["models"] if m["shape"] == shape]
        llms = [
            LLM(
                model=m["path"],
                trust_remote_code=True,
                dtype="float32",
                enforce_eager=True,
                max_model_len=job["prompt_len"] + job["max_tokens"] + 8,
                max_num_seqs=job["batch"],
                seed=0,
                skip_tokenizer_init=True,  # token-id prompts; the random models have no tokenizer
                model_impl=m["impl"],
            )
            for m in models
        ]
        rng = random.Random(0)
        vocab, length = models[0]["vocab"], job["prompt_len"]

        def batch(rng=rng, vocab=vocab, length=length, size=job["batch"]):
            return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]} for _ in range(size)]

        for llm in llms:
            llm.generate(batch(), params, use_tqdm=False)  # warm-up
        reps = {m["name"]: [] for m in models}
        for _ in range(job["reps"]):
            prompts = batch()  # the same prompts for both models
            for model, llm in zip(models, llms, strict=True):
                load = os.getloadavg()[0]
                start = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                record = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "load_1min": load}
                reps[model["name"]].append(record)
        for name, records in reps.items():
            print("RESULT " + json.dumps({"name": name, "reps": records}), flush=True)
        for llm in llms:
            llm.llm_engine.engine_core.shutdown()
        del llms
    return 0


def build(shape: str, root: Path) -> tuple[Path, Path]:
    """(base, SMILE folder) of a shape, with every default option of `smile upscale`."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from smile_cli.cli import run
    from tiny_models import make_family

    dims = SHAPES[shape]
    heads = dims["hidden_size"] // HEAD_DIM[shape]
    extra = dict(num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=512)
    base, experts = make_family(root / shape, "llama", **dims, **extra)
    out = root / shape / "smile"
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out), "--quiet"]
    argv += ["--expert-rank", EXPERT_RANK[shape]]
    assert run(argv) == 0
    return base, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run inside the vLLM venv
    parser.add_argument("--shapes", default="tiny,mid")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.engine:
        return engine(args.engine)

    sys.path.insert(0, str(ROOT))
    from smile_cli import vllm_env

    if not vllm_env.is_built():
        print(f"error: no vLLM venv at {vllm_env.venv_dir()}: {vllm_env.BUILD_COMMAND}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smile-vllm-bench-") as tmp:
        root = Path(tmp)
        models = []
        for shape in args.shapes.split(","):
            base, smile = build(shape, root)
            vocab = SHAPES[shape]["vocab_size"]
            # the base twice: vLLM's own Llama code, and the Transformers backend the SMILE folder runs through
            models += [dict(name=f"{shape} base", shape=shape, path=str(base), vocab=vocab, impl="auto")]
            models += [dict(name=f"{shape} base-tf", shape=shape, path=str(base), vocab=vocab, impl="transformers")]
            models += [dict(name=f"{shape} smile", shape=shape, path=str(smile), vocab=vocab, impl="transformers")]
        job = dict(vars(args), models=models)
        (root / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        print(f"load before: {os.getloadavg()}", flush=True)
        result = subprocess.run(
            [str(vllm_env.venv_python()), __file__, "--engine", str(root / "job.json")],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode:
            print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
            return 1
        rows = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"load after: {os.getloadavg()}")
    medians = {}
    for row in rows:
        print(json.dumps(row))
        medians[row["name"]] = statistics.median(r["tokens_per_s"] for r in row["reps"])
        loads = [r["load_1min"] for r in row["reps"]]
        print(f"{row['name']}: median {medians[row['name']]:.1f} tokens/s (load {min(loads):.1f}-{max(loads):.1f})")
    by_name = {row["name"]: row["reps"] for row in rows}
    for shape in args.shapes.split(","):
        smile = by_name[f"{shape} smile"]
        for other in ("base", "base-tf"):  # per round (interleaved), then the median
            pairs = zip(smile, by_name[f"{shape} {other}"], strict=True)
            ratios = [s["tokens_per_s"] / b["tokens_per_s"] for s, b in pairs]
            print(f"{shape}: SMILE / {other} throughput, median of rounds = {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
