"""Routing measurements on SMILE models of the tiny task experts: routing accuracy and oracle routing.

routing_accuracy(model, examples)     {task: [share of the task's tokens whose top expert is its own,
                                       per decoder layer]} for a SMILE model (experts in task order)
oracle_accuracy(model, examples)      accuracy with every SmileLinear forced to the task's own expert

Exact-match accuracy (accuracy, predictions, exact_match), teacher_forced_batch and count_params are the tiny
experts' own (scripts/tiny_experts/evaluate.py), re-exported here so that the benchmarks say E.accuracy.
"""

import contextlib
import re

import torch

from tiny_experts.evaluate import accuracy, count_params, exact_match, predictions, teacher_forced_batch

__all__ = [
    "accuracy",
    "count_params",
    "exact_match",
    "oracle_accuracy",
    "predictions",
    "routing_accuracy",
    "routing_hook",
    "teacher_forced_batch",
]


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
