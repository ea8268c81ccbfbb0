"""Random Mistral-shaped checkpoints written straight to disk (no model object), for benchmarks.

A base and T experts (base + a rank-16 update + noise in every decoder projection), in Hugging Face layout.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MistralConfig

PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def mistral_7b_config(layers: int) -> MistralConfig:
    """Mistral-7B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 kv heads x 128, vocab 32000), `layers` deep."""
    return MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
    }
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        for name, shape in per_layer.items():
            out[f"model.layers.{layer}.{name}.weight"] = shape
    return out


def write_family(
    root: Path, config: MistralConfig, num_experts: int = 3, dtype=torch.bfloat16, max_file_bytes: int = 2 * 10**9
) -> tuple[Path, list[Path]]:
    """Write base and experts under root (reused when already there); returns (base, experts)."""
    folders = [root / "base"] + [root / f"expert{i}" for i in range(num_experts)]
    if all((f / "config.json").exists() for f in folders):
        return folders[0], folders[1:]
    generator = torch.Generator().manual_seed(0)
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        files, current, size = [], {}, 0
        for name, shape in shapes(config).items():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            tensor = torch.randn(shape, generator=g) * 0.02
            if index and len(shape) == 2 and any(p in name for p in PROJECTIONS):
                b = torch.randn(shape[0], 16, generator=generator)
                a = torch.randn(16, shape[1], generator=generator)
                tensor += 0.002 * (b @ a) / 4 + 0.0005 * torch.randn(shape, generator=generator)
            tensor = tensor.to(dtype)
            if size + tensor.numel() * tensor.element_size() > max_file_bytes and current:
                files.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += tensor.numel() * tensor.element_size()
        files.append(current)
        weight_map = {}
        for k, tensors in enumerate(files):
            file_name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            save_file(tensors, folder / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file_name))
        index_json = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
        config_dict = config.to_dict()
        config_dict["dtype"] = str(dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    return folders[0], folders[1:]
