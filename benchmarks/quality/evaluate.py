"""Exact-match evaluation (batched greedy decoding with a KV cache), routing accuracy and oracle routing.

accuracy(model, examples)             {task: exact-match accuracy} over {task: [(prompt, answer), ...]}
predictions(model, examples)          {task: [greedy completion, ...]}; exact_match(preds, examples) scores them
routing_accuracy(model, examples)     {task: [share of the task's tokens whose top expert is its own,
                                       per decoder layer]} for a SMILE model (experts in task order)
oracle_accuracy(model, examples)      accuracy with every SmileLinear forced to the task's own expert
"""

import contextlib
import re

import tasks as T
import torch


def _left_pad(prompts: list[str]):
    seqs = [[T.BOS] + T.encode(p) for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), T.PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def generate(model, prompts: list[str], batch_size: int = 512, max_new_tokens: int = T.MAX_ANSWER_LEN + 1):
    """Greedy completions of prompts (strings up to EOS)."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[start : start + batch_size])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=T.PAD,
            eos_token_id=T.EOS,
        )
        outputs += [T.decode(row[ids.shape[1] :]) for row in out]
    return outputs


def predictions(model, examples: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """Greedy completions per task, in the examples' order; all tasks decoded together in large batches."""
    model.eval()
    flat = [(t, i, p) for t, pairs in examples.items() for i, (p, _) in enumerate(pairs)]
    flat.sort(key=lambda x: len(x[2]))  # less left padding per batch
    preds = generate(model, [p for _, _, p in flat])
    out = {t: [""] * len(pairs) for t, pairs in examples.items()}
    for (t, i, _), pred in zip(flat, preds, strict=True):
        out[t][i] = pred
    return out


def exact_match(preds: dict[str, list[str]], examples: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Exact-match accuracy per task of predictions(model, examples)."""
    return {
        t: sum(p == a for p, (_, a) in zip(preds[t], pairs, strict=True)) / len(pairs) for t, pairs in examples.items()
    }


def accuracy(model, examples: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Exact-match accuracy per task; all tasks decoded together in large batches."""
    return exact_match(predictions(model, examples), examples)


@contextlib.contextmanager
def routing_hook(model, fn):
    """Within the block, fn(name, weights (tokens, T)) sees every router's decision (the model's public routing
    hook); weights it returns replace the router's."""

    def hook(name, weights):
        out = fn(name, weights.reshape(-1, weights.shape[-1]))
        return None if out is None else out.reshape(weights.shape)

    handle = model.register_routing_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _layer_index(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def teacher_forced_batch(pairs: list[tuple[str, str]]):
    """(ids, mask) of BOS + prompt + answer + EOS for each (prompt, answer), right-padded."""
    seqs = [[T.BOS] + T.encode(p + a) + [T.EOS] for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), T.PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def routing_accuracy(model, examples, expert_of_task: dict[str, int], by: str = "layer") -> dict:
    """Per task and decoder layer: share of (prompt + gold answer) tokens whose top expert is the task's own.

    Averaged over the seven projections of the layer; teacher-forced, padding excluded. With
    by="projection": per projection type instead ({task: {"q_proj": share, ...}}), averaged over layers.
    With by="confusion": {task: [share of its tokens routed to expert e, for e in expert order]}, averaged
    over every SmileLinear.
    """
    result = {}
    for task, pairs in examples.items():
        ids, mask = teacher_forced_batch(pairs)
        keep = mask.flatten().bool()
        hits: dict[str, float] = {}

        def record(name, w, hits=hits, keep=keep, own=expert_of_task[task]):
            top = w[keep].argmax(dim=-1)
            if by == "confusion":  # share of tokens whose top expert is e, for every e
                hits[name] = torch.bincount(top, minlength=w.shape[-1]).float() / top.numel()
            else:
                hits[name] = (top == own).float().mean().item()

        with routing_hook(model, record):
            model(input_ids=ids, attention_mask=mask)
        if by == "confusion":  # averaged over every SmileLinear of the model
            result[task] = (sum(hits.values()) / len(hits)).tolist()
            continue
        if by == "projection":  # averaged over layers, one value per projection type (q_proj, ...)
            groups: dict[str, list[float]] = {}
            for n, v in hits.items():
                groups.setdefault(n.rsplit(".", 1)[-1], []).append(v)
            result[task] = {p: sum(v) / len(v) for p, v in groups.items()}
            continue
        n_layers = 1 + max(_layer_index(n) for n in hits)
        per_layer = [[] for _ in range(n_layers)]
        for n, v in hits.items():
            per_layer[_layer_index(n)].append(v)
        result[task] = [sum(v) / len(v) for v in per_layer]
    return result


def oracle_accuracy(model, examples, expert_of_task: dict[str, int]) -> dict[str, float]:
    """Accuracy when every SmileLinear adds exactly the task's own expert (weight 1) to every token."""
    result = {}
    for task, pairs in examples.items():
        e = expert_of_task[task]

        def one_hot(name, w, e=e):
            return torch.nn.functional.one_hot(torch.full(w.shape[:-1], e), w.shape[-1]).to(w)

        with routing_hook(model, one_hot):
            result.update(accuracy(model, {task: pairs}))
    return result


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
