"""Tiny PEFT LoRA adapters of a tiny base, built with peft in the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def make_lora(base: Path, folder: Path, seed: int, merged: Path | None = None, b_scale: float = 0.5, **lora_kwargs):
    """A LoRA adapter of base saved in `folder` (lora_B randomized so that the update is non-zero); with
    `merged`, also the dense fine-tune peft's merge_and_unload gives, saved there. Returns the peft model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(b_scale * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(folder)
    if merged is not None:
        scalings = {n: m.scaling["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
        peft_model.merge_and_unload().save_pretrained(merged)
        return scalings
    return None
