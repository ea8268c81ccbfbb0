"""Tiny trained task experts for client tests: a character tokenizer, three string tasks, a base and one expert per
task, trained here in seconds (nothing is downloaded).

Tasks (the task is recognisable only from the prompt's format, as in benchmarks/quality):
    reverse  "kqzp>"  -> "pzqk"      sort  "QDXA:"  -> "ADQX"      shift  "#482"  -> "593"
The base is pre-trained briefly on copying; each expert fine-tunes the base's decoder linears only (embeddings,
norms and the LM head stay the base's), so a SMILE model with dense experts and the right routing is the expert.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = 0, 1, 2
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + ">:#"
TASKS = ["reverse", "sort", "shift"]


def encode(text: str) -> list[int]:
    return [CHARS.index(c) + 3 for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        if int(i) == EOS:
            break
        if int(i) >= 3:
            out.append(CHARS[int(i) - 3])
    return "".join(out)


def example(task: str, rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 5)
    if task == "reverse":
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        return s + ">", s[::-1]
    if task == "sort":
        s = "".join(rng.choice(string.ascii_uppercase) for _ in range(n))
        return s + ":", "".join(sorted(s))
    if task == "shift":
        s = "".join(rng.choice(string.digits) for _ in range(n))
        return "#" + s, "".join(str((int(c) + 1) % 10) for c in s)
    if task == "copy":  # the base's pre-training: copy letters or digits after any separator
        alphabet = rng.choice([string.ascii_lowercase, string.ascii_uppercase, string.digits])
        s = "".join(rng.choice(alphabet) for _ in range(n))
        return s + rng.choice(">:#"), s
    raise ValueError(task)


def prompts(task: str, n: int, seed: int = 1000) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}-{seed}")
    return [example(task, rng) for _ in range(n)]


def tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (one token per character, BOS prepended), saved with the models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{c: i + 3 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )


def _batch(task_names, rng, size):
    seqs = []
    for _ in range(size):
        prompt, answer = example(rng.choice(task_names), rng)
        seqs.append([BOS, *encode(prompt), *encode(answer), EOS])
    width = max(len(s) for s in seqs)
    ids = torch.full((size, width), PAD)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    labels = ids.masked_fill(ids == PAD, -100)
    return ids, labels


def _train(model, task_names, steps, lr, seed, params):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids, labels = _batch(task_names, rng, 16)
        loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def build(root: Path) -> tuple[Path, list[Path]]:
    """Train the base and the experts (about 10 s on one idle core) into root; returns (base, [expert per task])."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = LlamaConfig(
            vocab_size=3 + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        _train(base, ["copy"], 120, 5e-3, 0, base.parameters())
        return _save_all(root, base)
    finally:
        torch.set_num_threads(threads)


def _save_all(root, base):
    tok = tokenizer()
    base.generation_config.pad_token_id = PAD
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    experts = []
    for i, task in enumerate(TASKS):
        expert = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        linears = [p for n, p in expert.named_parameters() if n.startswith("model.layers.") and "proj" in n]
        for p in expert.parameters():
            p.requires_grad_(False)
        for p in linears:
            p.requires_grad_(True)
        _train(expert, [task], 120, 5e-3, 1 + i, linears)
        expert.save_pretrained(root / task)
        tok.save_pretrained(root / task)
        experts.append(root / task)
    return root / "base", experts
