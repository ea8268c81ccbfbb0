"""Which nn.Linear modules of the base to upscale: the --target option.

Syntax: comma-separated glob patterns (`*` any run of characters, dots included; `?` one character;
`[abc]` one of a set), matched case-sensitively against module names. A pattern matches a module when it
matches the module's full name (model.layers.0.mlp.up_proj) or that name without some of its leading
dotted components (mlp.up_proj, up_proj). So `*.q_proj,*.v_proj`, `q_proj,v_proj`, `mlp.*`,
`encoder.*`, `model.layers.0.*` and `SelfAttention.?` all work. Each pattern must select at least one
nn.Linear module; only nn.Linear modules can be upscaled.

Default (no --target): every nn.Linear of the architecture except its output head (lm_head), which for
decoder LLMs (Mistral, Llama, Qwen, Gemma) is exactly the seven projections of every decoder layer.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from smile_cli.architecture import Architecture
from smile_cli.errors import InputError
from smile_cli.naming import layer_index, with_layer_wildcard

PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def parse_patterns(value) -> list[str] | None:
    """'*.q_proj, *.v_proj' or a list of patterns -> checked list; None or empty -> None (the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = [str(item).strip() for item in items if str(item).strip()]
    for pattern in patterns:
        if not PATTERN.fullmatch(pattern):
            raise ValueError(f"not a module-name pattern: {pattern!r} (use letters, digits, _ . - and * ? [ ])")
    return patterns or None


def matches(pattern: str, module: str) -> bool:
    parts = module.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def select_targets(ref: str, arch: Architecture, patterns: list[str] | None) -> list[str]:
    """Names of the nn.Linear modules to upscale, in module order; InputError naming a pattern that selects none."""
    if patterns is None:
        chosen = [name for name in arch.linears if name != arch.output_head]
        if not chosen:
            others = sorted(set(arch.other_weighted.values()))
            layers = f" (its layers are {', '.join(others)})" if others else ""
            raise InputError(f"{ref}: {arch.class_name} has no nn.Linear layer to upscale{layers}")
        return chosen
    chosen = set()
    for pattern in patterns:
        selected = {name for name in arch.linears if matches(pattern, name)}
        if not selected:
            others = [f"{name} ({kind})" for name, kind in arch.other_weighted.items() if matches(pattern, name)]
            if others:
                raise InputError(
                    f"--target '{pattern}' matches no nn.Linear module of {arch.class_name}: "
                    f"{_some(others)} are not nn.Linear; only nn.Linear layers can be upscaled"
                )
            raise InputError(
                f"--target '{pattern}' matches no nn.Linear module of {arch.class_name} "
                f"(its nn.Linear modules: {_some(describe(list(arch.linears), arch))})"
            )
        chosen |= selected
    return [name for name in arch.linears if name in chosen]


def describe(names: list[str], arch: Architecture) -> list[str]:
    """Module names grouped over their layer index: model.layers.*.mlp.up_proj when every layer's module is
    among names, model.layers.{0,3}.mlp.up_proj when only some are; in module order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(with_layer_wildcard(name), []).append(name)
    everywhere: dict[str, int] = {}
    for name in arch.linears:
        key = with_layer_wildcard(name)
        everywhere[key] = everywhere.get(key, 0) + 1
    described = []
    for key, members in groups.items():
        if "*" not in key or len(members) == everywhere.get(key):
            described.append(key)
        else:
            indices = [str(layer_index(m)) for m in members]
            described.append(key.replace("*", "{" + ",".join(indices) + "}", 1))
    return described


def _some(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
