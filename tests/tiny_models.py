"""Tiny base models and fine-tunes in Hugging Face layout, built in the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY_SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(arch: str, **overrides):
    if arch == "mistral":
        return MistralConfig(**{**TINY_SHAPE, **overrides})
    if arch == "llama":
        return LlamaConfig(**{**TINY_SHAPE, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**TINY_SHAPE, "tie_word_embeddings": True, **overrides})
    raise ValueError(arch)


def make_base(folder: Path, config, seed: int = 0, dtype=torch.float32) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(folder)
    return folder


def make_expert(
    base: Path,
    folder: Path,
    seed: int,
    update_rank: int = 3,
    scale: float = 0.5,
    noise: float = 0.01,
    dtype=torch.float32,
) -> Path:
    """A 'fine-tune' of base: every 2-D weight gets a random rank-`update_rank` update plus small noise,
    every bias a random shift."""
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name or "norm" in name:
                continue
            if p.dim() == 2:
                out_f, in_f = p.shape
                b = torch.randn(out_f, update_rank, generator=generator)
                a = torch.randn(update_rank, in_f, generator=generator)
                p += scale * (b @ a) / in_f**0.5 + noise * torch.randn(p.shape, generator=generator)
            else:
                p += 0.1 * torch.randn(p.shape, generator=generator)
    model.to(dtype).save_pretrained(folder)
    return folder


def make_family(root: Path, arch: str = "mistral", num_experts: int = 3, dtype=torch.float32, **overrides):
    """(base folder, [expert folders]) under root."""
    base = make_base(root / "base", tiny_config(arch, **overrides), dtype=dtype)
    experts = [make_expert(base, root / f"expert{i}", seed=100 + i, dtype=dtype) for i in range(num_experts)]
    return base, experts
