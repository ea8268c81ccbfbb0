"""Tiny tokenizers and fine-tunes built like published ones (nothing is downloaded): a word-level tokenizer of
96 tokens saved as PreTrainedTokenizerFast, experts that add ChatML tokens (with grown embeddings) and a chat
template, another vocabulary, another dtype, another tensor-name prefix, quantized tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB_SIZE = 96
# <|endoftext|>: transformers' Qwen2Tokenizer adds it when the vocabulary lacks it
WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "system", "hello", "world", "<|endoftext|>"]
WORDS += [f"w{i}" for i in range(VOCAB_SIZE - len(WORDS))]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)

PLAIN = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def save_tokenizer(folder: Path, added=(), swap=None, template: str | None = None, eos: str = "</s>") -> None:
    """The tiny word-level tokenizer (ids of WORDS), with `added` special tokens after it (ids 96, 97, ...), two
    words' ids swapped (another base vocabulary), a chat template, and its end-of-sequence token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    if swap:
        a, b = swap
        vocab[a], vocab[b] = vocab[b], vocab[a]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=eos, unk_token="<unk>"
    )
    for content in added:
        tokenizer.add_tokens([AddedToken(content, special=True, normalized=False)], special_tokens=True)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def grow_embeddings(folder: Path, rows: int, seed: int) -> None:
    """Resize folder's model to `rows` tokens, the new embedding (and untied head) rows random, as a fine-tune
    that added tokens and trained their rows."""
    cls = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(folder, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in {
            id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        }.values():
            weight[old:] = torch.randn(rows - old, weight.shape[1], generator=generator)
    _save_over(model, folder)


def _save_over(model, folder: Path) -> None:
    """save_pretrained into folder, which the model may have been loaded from (memory-mapped)."""
    temporary = folder.with_name(folder.name + ".saving")
    model.save_pretrained(temporary)
    for path in temporary.iterdir():
        shutil.move(str(path), folder / path.name)
    temporary.rmdir()


def convert_dtype(folder: Path, dtype: torch.dtype) -> None:
    path = folder / "model.safetensors"
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config))


def rename_tensors(folder: Path, rename) -> None:
    path = folder / "model.safetensors"
    state = {rename(k): v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})


def quantize_like(folder: Path, method: str) -> None:
    """Replace the q_proj weights of folder by the tensors a GPTQ or bitsandbytes checkpoint holds instead."""
    path = folder / "model.safetensors"
    state = load_file(path)
    for name in [n for n in state if n.endswith("q_proj.weight")]:
        module = name.removesuffix(".weight")
        out_f, in_f = state.pop(name).shape
        if method == "gptq":
            state[module + ".qweight"] = torch.zeros(in_f // 8, out_f, dtype=torch.int32)
            state[module + ".qzeros"] = torch.zeros(1, out_f // 8, dtype=torch.int32)
            state[module + ".scales"] = torch.ones(1, out_f, dtype=torch.float16)
            state[module + ".g_idx"] = torch.zeros(in_f, dtype=torch.int32)
        elif method == "bnb4":
            state[name] = torch.zeros(out_f * in_f // 2, 1, dtype=torch.uint8)
            state[name + ".absmax"] = torch.ones(out_f * in_f // 64)
            state[name + ".quant_map"] = torch.linspace(-1, 1, 16)
            state[name + ".quant_state.bitsandbytes__nf4"] = torch.zeros(64, dtype=torch.uint8)
        elif method == "bnb8":
            state[name] = torch.zeros(out_f, in_f, dtype=torch.int8)
            state[module + ".SCB"] = torch.ones(out_f)
            state[module + ".weight_format"] = torch.zeros(1, dtype=torch.uint8)
    save_file(state, path, metadata={"format": "pt"})


def set_token_ids(folder: Path, **ids) -> None:
    """Token ids in config.json and generation_config.json (eos_token_id=97, ...)."""
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config.update(ids)
        (folder / name).write_text(json.dumps(config))
