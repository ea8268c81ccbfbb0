"""Generation speed of SMILE models against their base, in transformers: prefill and decode, bfloat16 and float32.

A Mistral-shaped family (tests/synthetic_family.py: hidden 2048, intermediate 5632, 16 heads / 4 kv heads x 128,
vocab 32000, --layers decoder layers, base + 3 experts, bf16) is upscaled twice with the default ranks (router 8,
expert 128): `--routing faithful` (every SmileLinear routes every token) and `--routing prompt-model` (one mix
per prompt, the default for decoder-only LMs). In each dtype the base and both SMILE models are loaded with
transformers and timed interleaved (base, faithful, prompt-model, then again; median of --repeats), greedy
generate() with the KV cache:
  prefill:  a 512-token prompt, batch 1, max_new_tokens=1 (the prompt's forward pass and one token);
  decode:   a 16-token prompt at batch 1 and batch 8: (time of 1 + N new tokens - time of 1 new token) / N, per step
            (N = --new-tokens);
  head:     the output head alone (final norm + lm_head) on one step's hidden states, the part of a decode step that
            upscaling does not touch: `ratio_without_head` = (smile - head) / (base - head) is what deeper models
            (where the head is a smaller share) approach.
The ratio to the base is per case. --compare-modeling FILE adds both SMILE models again with FILE as their
modeling_smile.py (e.g. an earlier version: `git show REV:smile_cli/modeling/modeling_smile.py > FILE`), named
`faithful@before` and `prompt-model@before`, in the same interleaved rounds. One JSON document in --results.

  python benchmarks/generation_speed.py --layers 4 --results docs/results/generation_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(SRC / "tests"), str(SRC)]
from synthetic_family import mistral_7b_config, write_family  # noqa: E402

ROUTINGS = ("faithful", "prompt-model")


def build(root: Path, layers: int, vocab: int) -> dict[str, Path]:
    shape = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4)
    config = mistral_7b_config(layers, vocab_size=vocab, **shape)
    base, experts = write_family(root / "family", config, 3, spectrum="lowrank")
    models = {"base": base}
    for routing in ROUTINGS:
        out = root / f"smile-{routing}"
        if not (out / "config.json").exists():
            argv = [sys.executable, "-m", "smile_cli", "upscale", "--base", str(base), "--experts"]
            argv += [",".join(map(str, experts)), "--out", str(out), "--routing", routing, "--force", "--quiet"]
            subprocess.run(argv, check=True, env=dict(os.environ, PYTHONPATH=str(SRC)))
        models[routing] = out
    return models


def with_modeling(folder: Path, modeling: Path, name: str) -> Path:
    """A sibling of folder with the same weights (links) and config, and modeling as its modeling_smile.py."""
    variant = folder.parent / f"{folder.name}-{name}"
    variant.mkdir(exist_ok=True)
    for path in folder.iterdir():
        target = variant / path.name
        target.unlink(missing_ok=True)
        if path.name == "modeling_smile.py":
            shutil.copyfile(modeling, target)
        elif path.suffix == ".safetensors":
            target.symlink_to(path)
        elif path.is_file():
            shutil.copyfile(path, target)
    return variant


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-generation-speed"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--compare-modeling", type=Path, default=None, help="another modeling_smile.py to time")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    paths = build(args.root, args.layers, args.vocab)
    if args.compare_modeling:
        for routing in ROUTINGS:
            paths[f"{routing}@before"] = with_modeling(paths[routing], args.compare_modeling, "before")
    result = {
        "layers": args.layers,
        "hidden": 2048,
        "intermediate": 5632,
        "vocab": args.vocab,
        "experts": 3,
        "router_rank": 8,
        "expert_rank": 128,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "load_before": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": [],
    }
    generator = torch.Generator().manual_seed(0)
    prompts = {"prefill": torch.randint(3, args.vocab, (1, args.prefill), generator=generator)}
    for b in map(int, args.batches.split(",")):
        prompts[f"decode_b{b}"] = torch.randint(3, args.vocab, (b, 16), generator=generator)
    torch.set_grad_enabled(False)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        models = {
            name: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=name != "base").eval()
            for name, path in paths.items()
        }

        def generate(model, ids, new):
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

        def head(model, batch, dtype=dtype):
            h = torch.randn(batch, 1, 2048, dtype=dtype)
            return model.lm_head(model.model.norm(h))

        times = {(name, case): [] for name in models for case in [*prompts, *(f"head_b{b}" for b in [1, 8])]}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, model in models.items():
                samples = {"prefill": timed(lambda m=model: generate(m, prompts["prefill"], 1))}
                for case, ids in prompts.items():
                    if case.startswith("decode"):
                        one = timed(lambda m=model, i=ids: generate(m, i, 1))
                        many = timed(lambda m=model, i=ids: generate(m, i, 1 + args.new_tokens))
                        samples[case] = (many - one) / args.new_tokens
                        b = ids.shape[0]
                        heads = [timed(lambda m=model, b=b: head(m, b)) for _ in range(5)]
                        samples[f"head_b{b}"] = statistics.median(heads)
                if repeat:
                    for case, seconds in samples.items():
                        times[(name, case)].append(seconds)
            print(f"# {dtype_name} round {repeat} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        medians = {key: statistics.median(v) for key, v in times.items() if v}
        for case in prompts:
            base_s = medians[("base", case)]
            head_s = medians.get(("base", f"head_b{prompts[case].shape[0]}")) if case.startswith("decode") else None
            for name in models:
                s = medians[(name, case)]
                row = {"dtype": dtype_name, "model": name, "case": case, "seconds": round(s, 5)}
                row["ratio"] = round(s / base_s, 3)
                if case == "prefill":
                    row["tokens_per_s"] = round(args.prefill / s, 1)
                else:
                    row["tokens_per_s"] = round(prompts[case].shape[0] / s, 2)
                    row["head_s"] = round(head_s, 5)
                    row["ratio_without_head"] = round((s - head_s) / (base_s - head_s), 3)
                result["cases"].append(row)
                print(json.dumps(row), flush=True)
        del models
    result["load_after"] = round(os.getloadavg()[0], 2)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
