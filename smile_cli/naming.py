"""Module names: the layer index (the first numeric component: model.layers.3.mlp.up_proj -> 3), the module kind
(what follows it: mlp.up_proj), and the natural order of names (layers.2 before layers.10)."""

from __future__ import annotations

import re

LAYER = re.compile(r"\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """model.layers.3.mlp.up_proj -> 3; None for a module outside the numbered layers."""
    match = LAYER.search(module)
    return int(match.group(1)) if match else None


def module_kind(module: str) -> str:
    """model.layers.3.mlp.up_proj -> mlp.up_proj (the module name with its layer index and what precedes it
    dropped; a module outside the numbered layers is its own kind)."""
    match = LAYER.search(module)
    return module[match.end() :] if match else module


def with_layer_wildcard(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    return LAYER.sub(".*.", name, count=1)


def natural_key(name: str):
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
