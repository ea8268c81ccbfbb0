"""The shared synthetic Mistral generator (tests/synthetic_family.py, used by the benchmarks too) writes what
transformers loads as the architecture it names, with experts that differ from the base exactly in the upscaled
projections."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from synthetic_family import family_bytes, is_projection, mistral_7b_config, shapes, write_family


def _state(folder):
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def test_family_loads_in_transformers_and_experts_differ_only_in_projections(tmp_path):
    config = mistral_7b_config(2, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    config.vocab_size = 300
    base, experts = write_family(tmp_path, config, 2, max_file_bytes=400_000, spectrum="decaying")
    assert len(list(base.glob("*.safetensors"))) > 1 and (base / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert type(model).__name__ == "MistralForCausalLM"
    want = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert shapes(config) == want
    states = [_state(f) for f in (base, *experts)]
    assert sum(t.nbytes for t in states[0].values()) * 3 == family_bytes(config, 2)
    for name, tensor in states[0].items():
        for expert in states[1:]:
            assert torch.equal(expert[name], tensor) != is_projection(name), name
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(states[1][up], states[2][up])
    # the same arguments reuse the family; other arguments rewrite it
    stamp = (base / "config.json").stat().st_mtime_ns
    write_family(tmp_path, config, 2, max_file_bytes=400_000, spectrum="decaying")
    assert (base / "config.json").stat().st_mtime_ns == stamp
    write_family(tmp_path, config, 2, max_file_bytes=10**9, spectrum="lowrank")
    assert [p.name for p in base.glob("*.safetensors")] == ["model.safetensors"]
    assert json.loads((tmp_path / "family.json").read_text())[-2:] == ["lowrank", "cpu"]
