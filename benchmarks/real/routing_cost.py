"""Inference cost of each routing mode on the real model: prefill and greedy generation time, interleaved.

One SMILE folder (default: the adapters' rank-16 build of run.py --tag), loaded once per mode (smile_routing=MODE);
a batch of one chat-templated test prompt per task (left padding); per repeat and mode, in turn: one forward pass
over the prompts with a KV cache (the prefill), and generate() of 16 new tokens. Prints one JSON line: per mode the
median seconds of each, and the ratio to faithful's.

  python benchmarks/real/routing_cost.py [--model FOLDER] [--modes a,b] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as B  # noqa: E402
import tasks as T  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--modes", default="faithful,prompt-model,likelihood-prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model or B.cache_dir() / "out" / "s22m-smile-adapter-r16"
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": T.examples(t, "test", 1)[0][0]}], tokenize=False,
                                add_generation_prompt=True)
        for t in T.TASKS
    ]  # fmt: skip
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    modes = args.modes.split(",")
    models = {
        m: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, smile_routing=m).eval() for m in modes
    }
    times = {m: {"prefill": [], "generate16": []} for m in modes}
    load = [os.getloadavg()[0]]
    with torch.no_grad():
        for _ in range(args.repeats):
            for m, model in models.items():
                start = time.perf_counter()
                model(**enc, use_cache=True)
                times[m]["prefill"].append(time.perf_counter() - start)
                start = time.perf_counter()
                greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
                model.generate(**enc, **greedy)
                times[m]["generate16"].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    ref = med[modes[0]]
    out = {
        "model": str(folder),
        "prompt_tokens": list(enc["input_ids"].shape),
        "load_avg_1min_start_end": load,
        "median_s": med,
        f"ratio_to_{modes[0]}": {m: {k: round(v / ref[k], 2) for k, v in t.items()} for m, t in med.items()},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
