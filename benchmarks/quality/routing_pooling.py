"""Screening of zero-shot prompt-level routing rules (issue 22 item 2), from recorded per-token scores.

    python benchmarks/quality/routing_pooling.py --set hard-full|hard-lora|demo|bench-full|bench-lora|real [--n N]

One forward pass per prompt of a SMILE model (faithful routing, so the scores are the routers' own inputs), with a
forward pre-hook on every SmileLinear recording its input x; from x, every token's projection and spectral scores
s_i(x) (the model file's own projection_scores / spectral_scores). Then, offline, each pooling rule of RULES maps
the (modules, tokens, experts) scores of the prompt's real tokens to one decision per module (the expert a prompt
mode would route that module with) and the share of prompts whose decision is the task's own expert is counted:
"last" (the last module's decision, which pools every module) and "all" (every module of the prompt right).

Besides, the expert-likelihood candidates: the prompt run T more times with each expert forced on every token
(through model.register_routing_hook): the prompt's log-likelihood (sum over its tokens after the first), the
confidence of the next token (max log-probability at the last prompt position), and, with --answers, the mean
log-probability of the greedy answer each expert generates (T greedy decodings).

Prints and writes one JSON object (--out, default docs/results/routing_pooling_<set>.json).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts"), str(HERE.parent / "real")]


def centred(s):
    return s - s.mean(dim=-1, keepdim=True)


def lse(c, tau, dim):
    """tau * log mean exp(c / tau) over dim (a soft maximum; tau -> 0: the maximum, tau -> inf: the mean)."""
    return tau * (torch.logsumexp(c / tau, dim=dim) - math.log(c.shape[dim]))


def decisions(rule, s):
    """(modules,) expert each module routes with, from scores s (modules, L, T) of the prompt's real tokens."""
    kind, _, arg = rule.partition(":")
    c = centred(s)
    m = torch.arange(1, s.shape[0] + 1, dtype=s.dtype).view(-1, 1)
    if kind == "mean":  # prompt-model: mean over tokens, running mean over modules
        pooled = s.mean(dim=1).cumsum(dim=0) / m
    elif kind == "module-mean":  # each module on its own
        pooled = s.mean(dim=1)
    elif kind == "max":  # centred, max over tokens per module, running mean over modules
        pooled = c.amax(dim=1).cumsum(dim=0) / m
    elif kind == "lse":  # centred, soft maximum over tokens per module, running mean over modules
        pooled = lse(c, float(arg), 1).cumsum(dim=0) / m
    elif kind == "tok-lse":  # centred, running mean over modules per token, then soft maximum over tokens
        run = c.cumsum(dim=0) / m.unsqueeze(-1)
        pooled = lse(run, float(arg), 1)
    elif kind == "tok-max":
        run = c.cumsum(dim=0) / m.unsqueeze(-1)
        pooled = run.amax(dim=1)
    elif kind == "vote":  # soft vote: mean over tokens of softmax(c / tau) of the module-pooled token scores
        run = c.cumsum(dim=0) / m.unsqueeze(-1)
        pooled = (run / float(arg)).softmax(dim=-1).mean(dim=1)
    elif kind == "last":  # mean over the last k tokens only
        pooled = s[:, -int(arg) :].mean(dim=1).cumsum(dim=0) / m
    elif kind == "margin":  # tokens weighted by their spread across experts (module-pooled)
        run = c.cumsum(dim=0) / m.unsqueeze(-1)
        w = run.amax(dim=-1, keepdim=True) - run.amin(dim=-1, keepdim=True)
        pooled = (run * w ** float(arg)).sum(dim=1) / (w ** float(arg)).sum(dim=1).clamp_min(1e-12)
    elif kind == "rank":  # per module, the mean over tokens of each expert's rank among experts (0 worst)
        ranks = s.argsort(dim=-1).argsort(dim=-1).to(s.dtype)
        pooled = ranks.mean(dim=1).cumsum(dim=0) / m
    else:
        raise ValueError(rule)
    return pooled.argmax(dim=-1)


RULES = [
    "mean", "module-mean", "max", "lse:0.02", "lse:0.05", "lse:0.1", "lse:0.2",
    "tok-max", "tok-lse:0.01", "tok-lse:0.02", "tok-lse:0.05", "tok-lse:0.1",
    "vote:0.02", "vote:0.05", "vote:0.1", "last:4", "last:8", "last:16", "margin:1", "margin:2", "rank",
]  # fmt: skip


@torch.inference_mode()
def record(model, ids):
    """{"projection": (modules, L, T), "spectral": ...} float64 scores of one unpadded prompt ids (1, L)."""
    modeling = sys.modules[type(model).__module__]
    layers = [m for m in model.modules() if isinstance(m, modeling.SmileLinear) and m.router is not None]
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].detach())) for m in layers]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    t = layers[0].num_experts
    out = {"projection": [], "spectral": []}
    for m in layers:
        x = seen[m].reshape(-1, seen[m].shape[-1])
        out["projection"].append(modeling.projection_scores(x, m.router.weight, t))
        out["spectral"].append(modeling.spectral_scores(x, m.spectral_directions(), t))
    return {k: torch.stack(v).double() for k, v in out.items()}


@torch.inference_mode()
def likelihoods(model, ids, answers, eos, max_new):
    """{feature: [value per expert]} under each expert forced on every token."""
    n = model.config.num_local_experts
    out = {"prompt_ll": [], "next_conf": [], "answer_mean_lp": []}
    for e in range(n):

        def force(name, w, e=e):
            return torch.nn.functional.one_hot(torch.full(w.shape[:-1], e), n).to(w)

        handle = model.register_routing_hook(force)
        try:
            logits = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
            out["prompt_ll"].append(float(logits[:-1].gather(1, ids[0, 1:, None]).sum()))
            out["next_conf"].append(float(logits[-1].max()))
            if answers:
                gen = model.generate(ids, max_new_tokens=max_new, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
                lps = [float(sc[0].float().log_softmax(-1).max()) for sc in gen.scores]
                out["answer_mean_lp"].append(sum(lps) / len(lps))
        finally:
            handle.remove()
    return out


def tiny_set(name, cache):
    """(model, [(ids (1, L), own expert)]) of a tiny set."""
    import routing as R
    import routing_hard as H

    from tiny_experts import models as tiny
    from tiny_experts import tasks as T

    if name.startswith("hard"):
        models = tiny.build_or_load(cache, "demo", lora=name.endswith("lora"), log=lambda *_: None, **H.SETTINGS)
        sets = H.test_sets(models["tasks"])
        prompts = {f: sets[f] for f in H.SINGLE}
    else:
        preset = "demo" if name == "demo" else "bench"
        models = tiny.build_or_load(
            tiny.DEFAULT_CACHE if name == "demo" else cache, preset, lora=name.endswith("lora"), log=lambda *_: None
        )
        prompts = {"single": tiny.held_out(models["tasks"])[1]}
    out = cache / "smile-tmp" / f"pooling-{name}"
    R.upscale(models["base"], list(models["experts"].values()), out, 8, "16", 1, "faithful")
    model = tiny.load(out)
    items = [
        (f, torch.tensor([[T.BOS, *T.encode(p)]]), i)
        for f, per_task in prompts.items()
        for i, t in enumerate(models["tasks"])
        for p, _ in per_task[t]
    ]
    return model, items, T.EOS, T.CUED_MAX_ANSWER_LEN + 1 if name.startswith("hard") else T.MAX_ANSWER_LEN + 1


def real_set(n, folder):
    import build as B
    import tasks as RT
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder or B.cache_dir() / "out" / "smile-adapter-r16"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, smile_routing="faithful").eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    items = []
    for i, task in enumerate(RT.TASKS):
        for prompt, _ in RT.examples(task, "test", n):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            items.append(("chat", torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]), i))
    return model, items, tok.convert_tokens_to_ids("<|im_end|>"), 24


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", required=True)
    ap.add_argument("--n", type=int, default=20, help="real: test prompts per task")
    ap.add_argument("--model", type=Path, default=None, help="real: the SMILE folder")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--answers", action="store_true", help="also each expert's greedy answer's mean log-prob")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    if args.set == "real":
        model, items, eos, max_new = real_set(args.n, args.model)
    else:
        model, items, eos, max_new = tiny_set(args.set, args.cache)
    hits = {}  # (format, score, rule) -> [last right, all right] counts
    lk_hits = {}
    count = {}
    for fmt, ids, own in items:
        count[fmt] = count.get(fmt, 0) + 1
        scores = record(model, ids)
        for score, s in scores.items():
            for rule in RULES:
                d = decisions(rule, s)
                h = hits.setdefault(f"{fmt} {score} {rule}", [0, 0, 0.0])
                h[0] += int(d[-1] == own)
                h[1] += int(bool((d == own).all()))
                h[2] += float((d == own).double().mean())
        lk = likelihoods(model, ids, args.answers, eos, max_new)
        for feature, values in lk.items():
            if values:
                h = lk_hits.setdefault(f"{fmt} {feature}", [0])
                h[0] += int(max(range(len(values)), key=values.__getitem__) == own)
    result = {
        "set": args.set,
        "prompts": count,
        "seconds": round(time.time() - t0, 1),
        "rules": {
            k: {
                "last": v[0] / count[k.split()[0]],
                "all_modules": v[1] / count[k.split()[0]],
                "modules": v[2] / count[k.split()[0]],
            }
            for k, v in hits.items()
        },  # fmt: skip
        "likelihood": {k: v[0] / count[k.split()[0]] for k, v in lk_hits.items()},
    }
    out = args.out or HERE.parents[1] / "docs" / "results" / f"routing_pooling_{args.set}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in sorted(result["rules"].items(), key=lambda kv: -kv[1]["last"]):
        print(f"{k:40s} last {100 * v['last']:5.1f}  all {100 * v['all_modules']:5.1f}  mod {100 * v['modules']:5.1f}")
    for k, v in result["likelihood"].items():
        print(f"{k:40s} {100 * v:5.1f}")
    print(f"{result['seconds']} s")


if __name__ == "__main__":
    main()
