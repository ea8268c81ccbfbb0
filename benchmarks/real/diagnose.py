"""Why prompt-level routing picks one expert on the real model: per-layer scores of each expert on each task's
prompts, pooled over different token sets, observed through the routing hook and the routers' inputs.

For the SMILE model built from the LoRA adapters (router rank 8, expert rank 16), on `--n` test prompts per task:
  - the routing hook (model.register_routing_hook) records, per router, the prompt-model mix each prompt got
    (so the decision measured is the model's own, through the chat template as served);
  - forward hooks on the routers record their inputs, from which the projection scores s_i(x) (modeling_smile's
    projection_scores) are computed per token, then pooled over: all prompt tokens (what prompt-model does), the
    chat template's tokens only (system prompt, role markers), the user's tokens only; and over the raw user text
    without the template;
  - for each pooling, the fraction of prompts whose pooled (over tokens, then over all layers) top-1 expert is the
    task's own, and the per-expert mean score per layer (score scales across experts).
Writes docs/results/real_diagnosis.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as B  # noqa: E402
import tasks as T  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def user_span(tok, prompt: str) -> tuple[list[int], list[bool]]:
    """Chat-templated ids of prompt and, per token, whether it belongs to the user's text (found by offsets)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    start = text.index(prompt)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    user = [a >= start and b <= start + len(prompt) and b > a for a, b in enc["offset_mapping"]]
    return enc["input_ids"], user


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="SMILE folder (default: the run's smile-adapter-r16)")
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "real_diagnosis.json")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model or B.cache_dir() / "out" / "smile-adapter-r16"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, smile_routing="prompt-model").eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    projection_scores = sys.modules[type(model).__module__].projection_scores
    routers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "SmileRouter"]
    inputs, decisions = {}, {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach())) for n, m in routers]
    handle = model.register_routing_hook(lambda name, w: decisions.__setitem__(name, w.detach()))
    num = len(T.TASKS)
    poolings = ("all", "template", "user", "raw_user_text")
    hits = {p: [[0] * num for _ in T.TASKS] for p in poolings}  # [task][chosen expert] counts
    layer_means = {p: {t: torch.zeros(len(routers), num, dtype=torch.float64) for t in T.TASKS} for p in poolings}
    model_choice = [[0] * num for _ in T.TASKS]
    token_counts = {}
    with torch.no_grad():
        for ti, task in enumerate(T.TASKS):
            for prompt, _ in T.examples(task, "test", args.n):
                ids, user = user_span(tok, prompt)
                token_counts.setdefault(task, []).append((len(ids), sum(user)))
                raw = tok(prompt, add_special_tokens=False)["input_ids"]
                for pooling, seq in (("chat", ids), ("raw_user_text", raw)):
                    inputs.clear(), decisions.clear()
                    model(torch.tensor([seq]))
                    if pooling == "chat":  # the model's own decision: the last router's (cumulative) mix
                        last = list(decisions.values())[-1].reshape(-1, num)[0]  # the hook's names: the SmileLinears'
                        model_choice[ti][int(last.argmax())] += 1
                    per_layer = torch.stack(
                        [projection_scores(inputs[n][0], m.weight, num).double() for n, m in routers]
                    )  # (layers, L, T)
                    masks = {"raw_user_text": torch.ones(len(seq), dtype=torch.bool)}
                    if pooling == "chat":
                        u = torch.tensor(user)
                        masks = {"all": torch.ones_like(u), "template": ~u, "user": u}
                    for name, mask in masks.items():
                        pooled = per_layer[:, mask].mean(dim=1)  # (layers, T)
                        layer_means[name][task] += pooled / args.n
                        hits[name][ti][int(pooled.mean(dim=0).argmax())] += 1
    # faithful routing on the same prompts (the routers switched in place): per token, per layer, the top-1 expert
    for _, m in routers:
        m.set_routing("faithful")
    faithful = {p: [0.0] * num for p in ("all", "template", "user")}
    with torch.no_grad():
        for ti, task in enumerate(T.TASKS):
            for prompt, _ in T.examples(task, "test", args.n):
                ids, user = user_span(tok, prompt)
                decisions.clear()
                model(torch.tensor([ids]))
                chosen = torch.stack([w.reshape(len(ids), num).argmax(-1) for w in decisions.values()])  # (layers, L)
                u = torch.tensor(user)
                for name, mask in (("all", torch.ones_like(u)), ("template", ~u), ("user", u)):
                    faithful[name][ti] += float((chosen[:, mask] == ti).double().mean()) / args.n
    for h in (*handles, handle):
        h.remove()
    report = {
        "model": str(folder),
        "prompts_per_task": args.n,
        "tasks": list(T.TASKS),
        "model_decision_counts": model_choice,
        "pooled_decision_counts": hits,
        "own_expert_fraction": {p: [hits[p][i][i] / args.n for i in range(num)] for p in poolings},
        "faithful_own_expert_token_fraction": faithful,
        "tokens_per_prompt_and_user_tokens": {t: c[:3] for t, c in token_counts.items()},
        "mean_tokens": {
            t: [sum(a for a, _ in c) / len(c), sum(b for _, b in c) / len(c)] for t, c in token_counts.items()
        },
        "mean_score_by_expert": {p: {t: layer_means[p][t].mean(dim=0).tolist() for t in T.TASKS} for p in poolings},
        "per_layer_scores": {
            p: {
                t: {n: [round(v, 4) for v in layer_means[p][t][i].tolist()] for i, (n, _) in enumerate(routers)}
                for t in T.TASKS
            }
            for p in ("all", "user")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    keys = ("model_decision_counts", "own_expert_fraction", "faithful_own_expert_token_fraction", "mean_tokens")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    print(json.dumps(report["mean_score_by_expert"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
