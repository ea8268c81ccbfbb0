"""Exact-match evaluation of the tiny task models: batched greedy decoding with a KV cache.

accuracy(model, examples)        {task: exact-match accuracy} over {task: [(prompt, answer), ...]}
predictions(model, examples)     {task: [greedy completion, ...]}; exact_match(preds, examples) scores them
teacher_forced_batch(pairs)      (ids, mask) of prompt + answer, for logit and routing measurements
count_params(model)              parameters of a loaded model
"""

import torch

from . import tasks as T


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


def predictions(model, examples: dict[str, list[tuple[str, str]]], max_new_tokens: int = T.MAX_ANSWER_LEN + 1):
    """Greedy completions per task ({task: [completion, ...]}), in the examples' order; all tasks decoded together
    in large batches."""
    model.eval()
    flat = [(t, i, p) for t, pairs in examples.items() for i, (p, _) in enumerate(pairs)]
    flat.sort(key=lambda x: len(x[2]))  # less left padding per batch
    preds = generate(model, [p for _, _, p in flat], max_new_tokens=max_new_tokens)
    out = {t: [""] * len(pairs) for t, pairs in examples.items()}
    for (t, i, _), pred in zip(flat, preds, strict=True):
        out[t][i] = pred
    return out


def exact_match(preds: dict[str, list[str]], examples: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Exact-match accuracy per task of predictions(model, examples)."""
    return {
        t: sum(p == a for p, (_, a) in zip(preds[t], pairs, strict=True)) / len(pairs) for t, pairs in examples.items()
    }


def accuracy(model, examples: dict[str, list[tuple[str, str]]], max_new_tokens: int = T.MAX_ANSWER_LEN + 1):
    """Exact-match accuracy per task ({task: share}); all tasks decoded together in large batches."""
    return exact_match(predictions(model, examples, max_new_tokens), examples)


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


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
