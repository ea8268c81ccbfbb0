"""Runs vLLM for the tests, inside the vLLM venv (python -m smile_cli.vllm_env): `python vllm_driver.py JOB.json`.

JOB.json: {"out": RESULTS.json, "runs": [{"model": DIR, "llm": {LLM kwargs}, "tasks": [...]}, ...]}. Each run
starts one engine (LLM(model=DIR, **llm)) and runs its tasks, all greedy with ignore_eos (exactly max_tokens
tokens, as the reference's generate() without an eos); prompts are lists of token ids. Tasks:

- {"kind": "batch", "prompts": [...], "max_tokens": N}: one generate() call, the prompts scheduled together.
- {"kind": "one_by_one", "prompts": [...], "max_tokens": N}: one generate() call per prompt, in order (a later
  prompt sharing a prefix with an earlier one finds its KV blocks in the prefix cache: num_cached_tokens).
- {"kind": "arrival", "first": P, "later": [...], "after_steps": K, "max_tokens": N}: P is added to the engine,
  K engine steps run (P is decoding), then the later prompts are added while P decodes.

RESULTS.json: per run, {"tokens": [per task: [per prompt: token ids]], "cached": [...], "first_tokens_before":
...} or {"load_error": "..."} when the engine did not start (its message is on stderr).
"""

from __future__ import annotations

import gc
import json
import sys


def run_tasks(llm, tasks):
    from vllm import SamplingParams

    results = []
    for task in tasks:
        params = SamplingParams(temperature=0.0, max_tokens=task["max_tokens"], ignore_eos=True)
        if task["kind"] == "batch":
            outputs = llm.generate([{"prompt_token_ids": p} for p in task["prompts"]], params, use_tqdm=False)
            results.append({"tokens": [list(o.outputs[0].token_ids) for o in outputs]})
        elif task["kind"] == "one_by_one":
            tokens, cached = [], []
            for prompt in task["prompts"]:
                (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                tokens.append(list(output.outputs[0].token_ids))
                cached.append(output.num_cached_tokens or 0)
            results.append({"tokens": tokens, "cached": cached})
        elif task["kind"] == "arrival":
            results.append(arrival(llm.llm_engine, task, params))
        else:
            raise ValueError(task["kind"])
    return results


def arrival(engine, task, params):
    """Add the first prompt, step the engine task['after_steps'] times, add the later ones, step to the end."""
    tokens = {}
    engine.add_request("first", {"prompt_token_ids": task["first"]}, params)
    before = 0
    for _ in range(task["after_steps"]):
        for output in engine.step():
            before = len(output.outputs[0].token_ids)
    for i, prompt in enumerate(task["later"]):
        engine.add_request(f"later{i}", {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = list(output.outputs[0].token_ids)
    order = ["first"] + [f"later{i}" for i in range(len(task["later"]))]
    return {"tokens": [tokens[name] for name in order], "first_tokens_before": before}


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    from vllm import LLM

    results = []
    for run in job["runs"]:
        try:
            llm = LLM(model=run["model"], **run["llm"])
        except Exception as exc:  # the engine did not start: its root cause is on stderr
            results.append({"load_error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append({"tasks": run_tasks(llm, run["tasks"])})
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    with open(job["out"], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
