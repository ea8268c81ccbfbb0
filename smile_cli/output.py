"""Everything in an output folder besides the weights: config, modeling code, tokenizer, model card, manifest."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import smile_cli
from smile_cli.options import dump_options
from smile_cli.plan import Plan, format_mean_ranks

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_smile.py", "modeling_smile.py")
MANIFEST_NAME = "smile_manifest.json"
PARTIAL_MANIFEST_NAME = "smile_manifest.partial.json"
# Options that have a flag on the command line, in the order the model card's command shows them.
COMMAND_FLAGS = ("router_rank", "expert_rank", "top_k", "dtype", "max_shard_size", "seed")
OPTIONS_NAME = "smile_config.yaml"
# Copied byte for byte from the base when present.
BASE_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)


def smile_config(plan: Plan) -> dict:
    """The base config.json plus the SMILE fields, model_type smile_<base>, and auto_map to the copied code.

    The classes named in auto_map are `Smile` + the transformers class names (SmileT5Config,
    SmileT5ForConditionalGeneration, ...): modeling_smile.py and configuration_smile.py build them on first use.
    """
    arch, o, ranks = plan.architecture, plan.options, plan.ranks.values()
    config = {k: v for k, v in plan.base.config.items() if k not in ("torch_dtype", "auto_map", "_name_or_path")}
    auto_map = {"AutoConfig": f"configuration_smile.Smile{arch.config_class_name}"}
    auto_map.update({auto: f"modeling_smile.Smile{name}" for auto, name in arch.auto_classes.items()})
    config.update(
        model_type="smile_" + arch.model_type,
        architectures=["Smile" + arch.class_name],
        auto_map=auto_map,
        dtype=str(plan.out_dtype).removeprefix("torch."),
        num_local_experts=plan.num_experts,
        num_experts_per_tok=o.top_k,
        # `auto` ranks: the largest of any module here, each module's own in smile_ranks
        rank_of_router=o.router_rank if o.router_rank != "auto" else max(r.router for r in ranks),
        rank_of_expert=o.expert_rank_value if o.expert_rank != "auto" else max(max(r.experts) for r in ranks),
        smile_ranks=plan.ranks_table(),
        smile_target_modules=plan.target_modules,
        smile_routing=o.routing,
        smile_routing_temperature=o.routing_temperature,
    )
    return config


def manifest_head(plan: Plan, numerics: dict | None = None) -> dict:
    """What determines the output: tool version, options, each input's fingerprint (sources.py), and the math
    library (with the thread count where the bytes depend on it: factorize.numerics) of this process unless
    `numerics` gives the one the output was made with."""
    from smile_cli.factorize import numerics as this_process

    return {
        "tool": "smile",
        "version": smile_cli.__version__,
        "options": plan.options.model_dump(),
        "inputs": [c.fingerprint() for c in [plan.base, *plan.experts]],
        # allocated (auto) ranks: a resumed run must have allocated the same
        **({"ranks": plan.ranks_table()} if plan.budgeted else {}),
        "numerics": numerics or this_process(plan.options.svd),
    }


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a temporary file, fsynced, renamed over path."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def canonical_command(plan: Plan) -> str:
    """The command line that reproduces this output, built from the options (not from sys.argv), so that
    identical options give an identical model card; --out is left out as it does not change the files."""
    o = plan.options
    argv = ["smile", "upscale", "--base", o.base, "--experts", ",".join(o.experts)]
    for name in COMMAND_FLAGS:
        argv += ["--" + name.replace("_", "-"), str(getattr(o, name))]
    if o.target is not None:
        argv += ["--target", ",".join(o.target)]
    if o.routing != "faithful" or o.routing_temperature != 1.0:  # faithful outputs keep their model card
        argv += ["--routing", o.routing, "--routing-temperature", str(o.routing_temperature)]
    return shlex.join(argv) + " --out OUT"


def write_metadata_files(
    plan: Plan, folder: Path, shards, command: str | None = None, svd: dict | None = None, numerics: dict | None = None
) -> None:
    """Write everything besides the weights into folder; `numerics`: as the shards were made (manifest_head)."""
    (folder / "config.json").write_text(json.dumps(smile_config(plan), indent=2, sort_keys=True) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)
    for path in sorted(base_files(plan.base.path)):
        shutil.copyfile(path, folder / path.name)
    (folder / OPTIONS_NAME).write_text(dump_options(plan.options))
    (folder / "README.md").write_text(model_card(plan, command or canonical_command(plan), svd))
    manifest = manifest_head(plan, numerics)
    manifest["shards"] = [{"name": s.name, "size": s.size, "sha256": s.sha256} for s in shards]
    write_json(folder / MANIFEST_NAME, manifest)
    (folder / PARTIAL_MANIFEST_NAME).unlink(missing_ok=True)


def base_files(folder: Path) -> set[Path]:
    return {p for pattern in BASE_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def _factorization_lines(svd: dict | None) -> str:
    """The model card's account of the factorization: method and measured error against the optimum."""
    if not svd:
        return ""
    r = svd["randomized"]
    lines = [
        f"- Factorization: --svd {svd['svd']} (randomized: sketch of max(rank + {r['oversample']}, "
        f"{r['min_sketch']}) columns, {r['power_iterations']} power iterations ({r['small_sketch_power_iterations']} "
        f"for a sketch of at most {r['min_sketch']}), seed {r['seed']}; exact: thin LAPACK SVD)",
    ]
    if svd["error_ratio_checks"]:
        lines.append(
            "- Measured (first layer of each shape, expert 0): rank-k error / optimal rank-k error, and for the router "
            "a guaranteed lower bound on the smallest cosine of the principal angles between its directions and the "
            "exact top singular subspace (1 = exact)"
        )
        for c in svd["error_ratio_checks"]:
            router = f"; router rank {c['router_rank']}: {c['router_min_cosine']:.4f}" if "router_rank" in c else ""
            lines.append(f"  - `{c['module']}` (rank {c['rank']}, {c['method']}): {c['error_ratio']:.4f}{router}")
    return "\n".join(lines) + "\n"


def model_card(plan: Plan, command: str | None, svd: dict | None = None) -> str:
    o = plan.options
    expert_rank = "full (dense task updates)" if o.dense_experts else str(o.expert_rank)
    ranks = f"Router rank: {o.router_rank}; expert rank: {expert_rank}"
    if plan.budgeted:
        means = "; ".join(f"`{kind}` {format_mean_ranks(r)}" for kind, r in plan.ranks_by_kind().items())
        budget = f" under the budget {o.budget}" if o.budget else ""
        ranks += f" (allocated per module{budget}; each module's in config.json `smile_ranks`; means: {means})"
    experts = "\n".join(f"{i}. `{e.ref}`" for i, e in enumerate(plan.experts))
    made_with = f"```\n{command}\n```" if command else "(called from the smile_cli library)"
    targeted = "\n".join(f"  - `{m}`" for m in plan.targeted_modules)
    auto_class = plan.architecture.main_auto_class
    return f"""---
library_name: transformers
tags:
- smile
- mixture-of-experts
- model-merging
base_model: {o.base}
---

# SMILE model: {plan.base.ref} + {plan.num_experts} experts

A Sparse Mixture of Low-rank Experts (SMILE; Tang et al., arXiv 2408.10174) built zero-shot by `smile`:
every upscaled linear layer of the base keeps the base weight and gains one low-rank expert per
fine-tuned model (the top singular components of its task update), with a router that picks experts per
token from the projection of the input onto each expert's top right singular vectors.

- Base: `{plan.base.ref}`
- Experts (index: model):
{experts}
- {ranks}; experts per token (top-k): {o.top_k}
- Architecture: {plan.architecture.class_name} (model_type `{plan.architecture.model_type}`)
- Upscaled layers: {len(plan.linears)}, the nn.Linear modules
{targeted}
- Parameters: {_millions(plan.out_params)} against the base's {_millions(plan.base_params)} \
({plan.out_params / plan.base_params:.3f}x)
- Weights: {str(plan.out_dtype).removeprefix("torch.")} (routers in float32), {plan.num_shards} safetensors file(s)
{_factorization_lines(svd)}
## Load

```python
from transformers import {auto_class}
model = {auto_class}.from_pretrained("path/to/this/folder", trust_remote_code=True)
```

The modeling code (`modeling_smile.py`, `configuration_smile.py`) is in this folder and needs only torch
and transformers; it works offline.

## Made with

{made_with}

The effective options are in `smile_config.yaml`; inputs and shard checksums in `smile_manifest.json`.
"""
