"""Tiny base models and fine-tunes in Hugging Face layout, built in the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)

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
    if arch == "qwen3":
        return Qwen3Config(**{**TINY_SHAPE, "head_dim": 8, **overrides})
    if arch == "gemma":
        return GemmaConfig(**{**TINY_SHAPE, "head_dim": 8, **overrides})
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**{**TINY_SHAPE, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1, **overrides})
    if arch == "t5":  # encoder-decoder; tied embeddings unless tie_word_embeddings=False
        shape = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
        return T5Config(**{**shape, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, **overrides})
    if arch == "clip_vision":
        shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
        return CLIPVisionConfig(**{**shape, "image_size": 16, "patch_size": 8, **overrides})
    raise ValueError(arch)


# The transformers class each tiny architecture is built and saved with (config.json 'architectures').
MODEL_CLASSES = {"t5": "T5ForConditionalGeneration", "clip_vision": "CLIPVisionModel"}


def model_class(arch: str):
    return getattr(transformers, MODEL_CLASSES.get(arch, "AutoModelForCausalLM"))


def _class_of_folder(folder: Path):
    import json

    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def make_base(folder: Path, config, seed: int = 0, dtype=torch.float32, cls=None) -> Path:
    torch.manual_seed(seed)
    model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
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
    model = _class_of_folder(base).from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("embed", "lm_head", "norm", "shared")):
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


def save_image_processor(folder: Path, image_size: int) -> None:
    """A CLIP image processor (the PIL backend: no torchvision needed) that makes image_size x image_size inputs,
    saved as the folder's preprocessor_config.json (image_processor_type CLIPImageProcessor)."""
    square = {"height": image_size, "width": image_size}
    transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square).save_pretrained(folder)


def make_family(root: Path, arch: str = "mistral", num_experts: int = 3, dtype=torch.float32, **overrides):
    """(base folder, [expert folders]) under root. A clip_vision base comes with its image processor."""
    cls = model_class(arch) if arch in MODEL_CLASSES else None
    config = tiny_config(arch, **overrides)
    base = make_base(root / "base", config, dtype=dtype, cls=cls)
    if arch == "clip_vision":
        save_image_processor(base, config.image_size)
    experts = [make_expert(base, root / f"expert{i}", seed=100 + i, dtype=dtype) for i in range(num_experts)]
    return base, experts
