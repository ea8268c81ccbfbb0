"""The one generator of synthetic Mistral-shaped checkpoint families, shared by the tests and every benchmark.

Weights are written straight to disk as safetensors (no model object is built, so a Mistral-7B-shaped layer costs
its bytes and a few seconds, not a model's memory): a base and T experts in Hugging Face layout, each expert the
base plus a fine-tuning-like update in every decoder projection (copied tensors, norms and embeddings equal the
base's). Two update spectra:
  lowrank:  a rank-16 update + noise (0.002 / 4 * B A + 5e-4 per entry), a clear top-16 subspace;
  decaying: 256 rank-one terms decaying as exp(-i/40) from 0.02 + noise 2e-4 per entry (a flatter tail).
The base tensors are seeded by name, so a family with more layers starts with the same tensors as a shorter one.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MistralConfig

PROJECTIONS = {  # the upscaled projections of a decoder layer: (out, in) as functions of hidden, intermediate, kv
    "self_attn.q_proj": lambda h, i, kv: (h, h),
    "self_attn.k_proj": lambda h, i, kv: (kv, h),
    "self_attn.v_proj": lambda h, i, kv: (kv, h),
    "self_attn.o_proj": lambda h, i, kv: (h, h),
    "mlp.gate_proj": lambda h, i, kv: (i, h),
    "mlp.up_proj": lambda h, i, kv: (i, h),
    "mlp.down_proj": lambda h, i, kv: (h, i),
}
SPECTRA = ("lowrank", "decaying")


def mistral_7b_config(layers: int, **overrides) -> MistralConfig:
    """Mistral-7B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 kv heads x 128, vocab 32000), `layers` deep;
    overrides (hidden_size=256, ...) give a narrower family of the same architecture."""
    values = dict(
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
    values.update(overrides)
    if "hidden_size" in overrides and "head_dim" not in overrides:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    return MistralConfig(**values)


def shapes(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the family's checkpoints, name -> shape, in the order they are written."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (config.head_dim or h // config.num_attention_heads)
    per_layer = {name: shape(h, i, kv) for name, shape in PROJECTIONS.items()}
    per_layer.update({"input_layernorm": (h,), "post_attention_layernorm": (h,)})
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        for name, shape in per_layer.items():
            out[f"model.layers.{layer}.{name}.weight"] = shape
    return out


def family_bytes(config: MistralConfig, num_experts: int, dtype=torch.bfloat16) -> int:
    """Bytes of weights of base + experts (for a disk check before writing)."""
    per_model = sum(torch.Size(s).numel() for s in shapes(config).values()) * torch.empty(0, dtype=dtype).element_size()
    return per_model * (num_experts + 1)


def is_projection(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}.weight" in name for p in PROJECTIONS) and ".layers." in name


def update(shape: tuple[int, int], generator: torch.Generator, spectrum: str = "lowrank") -> torch.Tensor:
    """One fine-tuning-like task update (float32) of the given shape."""
    out_f, in_f = shape
    device = generator.device
    if spectrum == "lowrank":
        b = torch.randn(out_f, 16, generator=generator, device=device)
        a = torch.randn(16, in_f, generator=generator, device=device)
        return 0.002 * (b @ a) / 4 + 0.0005 * torch.randn(shape, generator=generator, device=device)
    if spectrum == "decaying":
        rank = 256
        b = torch.randn(out_f, rank, generator=generator, device=device) / out_f**0.5
        a = torch.randn(rank, in_f, generator=generator, device=device) / in_f**0.5
        decay = 0.02 * torch.exp(-torch.arange(rank, device=device) / 40.0)
        return (b * decay) @ a + 2e-4 * torch.randn(shape, generator=generator, device=device)
    raise ValueError(f"spectrum must be one of {SPECTRA}, not {spectrum!r}")


def write_family(
    root: Path,
    config: MistralConfig,
    num_experts: int = 3,
    dtype=torch.bfloat16,
    max_file_bytes: int = 2 * 10**9,
    spectrum: str = "lowrank",
    device: str = "cpu",
) -> tuple[Path, list[Path]]:
    """Write base and experts under root (reused when a family written with the same arguments is there);
    returns (base folder, [expert folders]). Files of at most max_file_bytes each (an index when more than one).
    device: where the random numbers are drawn (a GPU draws other numbers than the CPU, much faster)."""
    root = Path(root)
    folders = [root / "base"] + [root / f"expert{i}" for i in range(num_experts)]
    recipe = json.dumps([config.to_dict(), num_experts, str(dtype), max_file_bytes, spectrum, device], sort_keys=True)
    marker = root / "family.json"
    if marker.exists() and marker.read_text() == recipe and all((f / "config.json").exists() for f in folders):
        return folders[0], folders[1:]
    marker.unlink(missing_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.safetensors*"):
            old.unlink()
        files, current, size = [], {}, 0
        for name, shape in shapes(config).items():
            named = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
            tensor = torch.randn(shape, generator=named, device=device) * 0.02
            if len(shape) == 1:
                tensor = 1.0 + tensor  # norm weights near one, as trained models have
            if index and is_projection(name):
                tensor += update(shape, generator, spectrum)
            tensor = tensor.to(dtype).cpu()
            if size + tensor.numel() * tensor.element_size() > max_file_bytes and current:
                files.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += tensor.numel() * tensor.element_size()
        files.append(current)
        if len(files) == 1:
            save_file(files[0], folder / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, tensors in enumerate(files):
                file_name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                save_file(tensors, folder / file_name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file_name))
            total = sum(t.numel() * t.element_size() for f in files for t in f.values())
            index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        config_dict = config.to_dict()
        config_dict.update(architectures=["MistralForCausalLM"], dtype=str(dtype).removeprefix("torch."))
        (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
        del files, current
    marker.write_text(recipe)
    return folders[0], folders[1:]


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))
