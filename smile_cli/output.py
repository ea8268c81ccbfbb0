"""Everything in an output folder besides the weights: config, modeling code, tokenizer, model card, manifest."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import yaml

import smile_cli
from smile_cli import defaults
from smile_cli.kept import grouped
from smile_cli.options import dump_options
from smile_cli.plan import Plan, format_mean_ranks
from smile_cli.trust import MODELING_DIR, MODELING_FILES, remove_custom_code
from smile_cli.vocab import TOKENIZER_PATTERNS, config_fields, write_tokenizer
from smile_cli.writer import write_json

MANIFEST_NAME = "smile_manifest.json"
PARTIAL_MANIFEST_NAME = "smile_manifest.partial.json"
# Options that have a flag on the command line, in the order the model card's command shows them.
COMMAND_FLAGS = ("router_rank", "expert_rank", "top_k", "dtype", "max_shard_size", "seed")
OPTIONS_NAME = "smile_config.yaml"
# Copied byte for byte from the tokenizer's source (the base, or --tokenizer N's expert) when present; the
# tokenizer and its chat template are written by vocab.write_tokenizer. Every file of an output besides weights
# and metadata (export.py copies them on).
SOURCE_FILES = ("generation_config.json", "preprocessor_config.json")
BASE_FILE_PATTERNS = (*TOKENIZER_PATTERNS, "chat_template*", *SOURCE_FILES)


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
    if plan.calibration is not None:  # only then: an output without --calibrate keeps its bytes
        config["smile_calibrated_routers"] = True
    if engine_routing(plan):  # only then: the outputs of an explicit --routing keep their bytes
        config["smile_engine_routing"] = engine_routing(plan)
    config.update(config_fields(plan))  # vocab_size and token ids of the output's tokenizer
    return config


def manifest_head(plan: Plan, numerics: dict | None = None) -> dict:
    """What determines the output: tool version, options, each input's fingerprint (inputs/checkpoint.py), and the math
    library (with the thread count where the bytes depend on it: factorize.numerics) of this process unless
    `numerics` gives the one the output was made with."""
    from smile_cli.factorize import numerics as this_process

    return {
        "tool": "smile",
        "version": smile_cli.__version__,
        "options": plan.options.model_dump(),
        "inputs": [c.fingerprint() for c in [plan.base, *plan.experts]],
        # allocated (auto) ranks: a resumed run must have allocated the same
        **({"ranks": plan.ranks_table()} if plan.per_module_ranks else {}),
        "numerics": numerics or this_process(plan.options.svd),
        # tokens added to the base's: their embedding rows are in the shards
        **({"vocabulary": plan.vocabulary.summary()} if plan.vocabulary.computed else {}),
        # why --routing auto chose options.routing; not compared on --resume (staging.describe_changes): a run
        # resumed with the routing it resolved to, given or from auto, is the same output
        **({"routing_auto": plan.routing_auto} if plan.routing_auto else {}),
        # --calibrate: the prompts file's digest and the threads the fit ran on (compared on --resume)
        **({"calibration": plan.calibration.record()} if plan.calibration is not None else {}),
    }


def canonical_command(plan: Plan) -> str:
    """The command line that reproduces this output, built from the options (not from sys.argv), so that
    identical options give an identical model card: every option that changes the files (defaults left out where
    they are not written as flags); --out, --device, --inputs and the run controls are left out, as they do not."""
    o = plan.options
    argv = ["smile", "upscale", "--base", o.base, "--experts", ",".join(o.experts)]
    for name in COMMAND_FLAGS:
        argv += ["--" + name.replace("_", "-"), str(getattr(o, name))]
    if o.budget is not None:
        argv += ["--budget", o.budget]
    if o.svd != defaults.SVD:
        argv += ["--svd", o.svd]
    if o.target is not None:
        argv += ["--target", ",".join(o.target)]
    if plan.routing_auto is None:  # given; chosen by auto: the default reproduces it
        argv += ["--routing", o.routing]
    if o.routing_temperature != defaults.ROUTING_TEMPERATURE:
        argv += ["--routing-temperature", str(o.routing_temperature)]
    if o.tokenizer != "base":
        argv += ["--tokenizer", o.tokenizer]
    if o.chat_template != "auto":
        argv += ["--chat-template", o.chat_template]
    if o.allow_vocab_mismatch:
        argv += ["--allow-vocab-mismatch"]
    if o.calibrate is not None:
        argv += ["--calibrate", o.calibrate]
    return shlex.join(argv) + " --out OUT"


def write_metadata_files(
    plan: Plan, folder: Path, shards, command: str | None = None, svd: dict | None = None, head: dict | None = None
) -> None:
    """Write everything besides the weights into folder; `head`: the manifest head the run was made with
    (manifest_head of the plan before any factor was computed; by default this plan's)."""
    (folder / "config.json").write_text(json.dumps(smile_config(plan), indent=2, sort_keys=True) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)
    write_tokenizer(plan, folder)
    source = plan.vocabulary.source or plan.base
    for name in SOURCE_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, folder / name)
    remove_custom_code(folder)  # an input's tokenizer or processor code (--trust-remote-code) is never carried
    (folder / OPTIONS_NAME).write_text(dump_options(plan.options))
    (folder / "README.md").write_text(model_card(plan, command or canonical_command(plan), svd))
    manifest = dict(head or manifest_head(plan))
    if plan.calibrated is not None:
        manifest["calibration_fit"] = plan.calibrated.report
    manifest["shards"] = [s.record() for s in shards]
    write_json(folder / MANIFEST_NAME, manifest)
    (folder / PARTIAL_MANIFEST_NAME).unlink(missing_ok=True)


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


def front_matter(plan: Plan) -> str:
    """The model card's metadata block, as the Hub reads it: base_model (the base and every expert given as a
    Hub id; local folders have none), library_name, tags, and the license when every input states the same."""
    inputs = [plan.base, *plan.experts]
    hub_ids = [c.ref.partition("@")[0] for c in inputs if c.revision is not None]
    licenses = {input_license(c.path) for c in inputs}
    meta: dict = {}
    if hub_ids:
        meta["base_model"] = list(dict.fromkeys(hub_ids))
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    if len(licenses) == 1 and None not in licenses:
        meta["license"] = licenses.pop()
    if plan.architecture.main_auto_class == "AutoModelForCausalLM":
        meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["merge", "moe", "smile", "mixture-of-experts", "model-merging"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def input_license(folder: Path) -> str | None:
    """The `license:` of a model folder's README.md metadata block, if it has one."""
    try:
        text = (folder / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    block = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def _vocabulary_lines(plan: Plan) -> str:
    """The model card's account of the tokenizer, chat template, output dtype and tensors the experts changed."""
    vocabulary, lines = plan.vocabulary, []
    if vocabulary.mode == "base":
        tokenizer = "the base's"
    elif vocabulary.mode == "union":
        tokenizer = f"union: the base's plus {len(vocabulary.new_tokens)} token(s) the experts add"
    else:
        tokenizer = f"`{plan.experts[int(vocabulary.mode) - 1].ref}`'s (--tokenizer {vocabulary.mode})"
    lines.append(f"- Tokenizer: {tokenizer}; {vocabulary.size} embedding rows (`vocab_size`)")
    for token in vocabulary.new_tokens:
        sources = ", ".join(f"`{plan.experts[i].ref}` (id {token_id})" for i, token_id in token.sources)
        how = "the mean of " if len(token.sources) > 1 else ""
        lines.append(f"  - `{token.content}`: id {token.id}, embedding and output rows from {how}{sources}")
    lines += [f"  - {note}" for note in vocabulary.notes]
    lines.append(f"- Chat template: {vocabulary.template_origin}")
    if plan.kept_differences:
        lines.append("- Non-upscaled tensors an expert changed (SMILE keeps the base's; difference to the base's):")
        lines += [f"  - {line}" for line in grouped(plan.kept_differences)]
    return "\n".join(lines) + "\n"


def engine_routing(plan: Plan) -> str | None:
    """What a serving engine that packs requests (vLLM) runs instead of the output's routing (config.json
    smile_engine_routing): faithful, where `--routing auto` chose a prompt mode, so that the default output serves;
    None for a per-token mode, or a prompt mode given by name (an engine refuses it: modeling_smile._engine_routing)."""
    from smile_cli.modeling.modeling_smile import PER_TOKEN_ROUTING

    return "faithful" if plan.routing_auto and plan.options.routing not in PER_TOKEN_ROUTING else None


def routing_line(plan: Plan) -> str:
    """The model card's account of the routing: the mode, what it does, and who chose it."""
    o = plan.options
    if o.routing == "faithful":
        what = "the paper's router: every upscaled layer picks experts per token"
    elif o.routing == "calibrated":
        what = "every upscaled layer picks experts per token with the routers fitted to the example prompts (below)"
    else:
        engine = engine_routing(plan)
        what = "one expert mix per sequence, chosen from its prompt and kept for the generated tokens; " + (
            f"serving engines that pack requests into one sequence (vLLM) run it as `{engine}` "
            "(config.json `smile_engine_routing`)"
            if engine
            else 'serving engines that pack requests into one sequence need `smile_routing="faithful"` '
            "(modeling_smile.py)"
        )
    from smile_cli.modeling.modeling_smile import ROUTING_MODES

    pooled = (ROUTING_MODES[o.routing] or (None, None))[1] == "mean"  # the temperature plays a part
    temperature = f", temperature {o.routing_temperature:g}" if pooled else ""
    chosen = f"chosen by --routing auto: {plan.routing_auto}" if plan.routing_auto else f"--routing {o.routing}"
    return f"- Routing: `{o.routing}`{temperature} ({chosen}): {what}; config.json `smile_routing`"


def calibration_lines(plan: Plan) -> str:
    """The model card's account of --calibrate (calibrate.card_lines), or nothing."""
    from smile_cli.calibrate import card_lines

    return card_lines(plan.calibrated.report) if plan.calibrated is not None else ""


def model_card(plan: Plan, command: str | None, svd: dict | None = None) -> str:
    o = plan.options
    expert_rank = "full (dense task updates)" if o.dense_experts else str(o.expert_rank)
    ranks = f"Router rank: {o.router_rank}; expert rank: {expert_rank}"
    if plan.budgeted:
        means = "; ".join(f"`{kind}` {format_mean_ranks(r)}" for kind, r in plan.ranks_by_kind().items())
        budget = f" under the budget {o.budget}" if o.budget else ""
        ranks += f" (allocated per module{budget}; each module's in config.json `smile_ranks`; means: {means})"
    elif plan.clamped:
        means = "; ".join(f"`{kind}` {format_mean_ranks(r)}" for kind, r in plan.ranks_by_kind().items())
        ranks += (
            " (clamped to the rank each expert's update holds, a LoRA adapter's r or a fine-tuned checkpoint's "
            "numerical rank: rows beyond it would be zeros or the merge's rounding noise; "
            f"each module's in config.json `smile_ranks`; means: {means})"
        )
    experts = "\n".join(f"{i}. `{e.ref}`" for i, e in enumerate(plan.experts))
    dtype = str(plan.out_dtype).removeprefix("torch.")
    dtype_rule = "--dtype auto: the base's" if o.dtype == "auto" else f"--dtype {o.dtype}"
    made_with = f"```\n{command}\n```" if command else "(called from the smile_cli library)"
    targeted = "\n".join(f"  - `{m}`" for m in plan.targeted_modules)
    auto_class = plan.architecture.main_auto_class
    return f"""{front_matter(plan)}
# SMILE model: {plan.base.ref} + {plan.num_experts} experts

A Sparse Mixture of Low-rank Experts (SMILE; Tang et al., arXiv 2408.10174) built zero-shot by `smile`:
every upscaled linear layer of the base keeps the base weight and gains one low-rank expert per
fine-tuned model (the top singular components of its task update), with a router that picks experts
(Routing below) from the projection of the input onto each expert's top right singular vectors.

- Base: `{plan.base.ref}`
- Experts (index: model):
{experts}
- {ranks}; experts per token (top-k): {o.top_k}
{routing_line(plan)}
{calibration_lines(plan)}- Architecture: {plan.architecture.class_name} (model_type `{plan.architecture.model_type}`)
- Upscaled layers: {len(plan.linears)}, the nn.Linear modules
{targeted}
- Parameters: {_millions(plan.out_params)} against the base's {_millions(plan.base_params)} \
({plan.out_params / plan.base_params:.3f}x)
- Weights: {dtype} ({dtype_rule}; routers in float32; experts stored in other floating dtypes are read as \
they are and their updates formed in float32), {plan.num_shards} safetensors file(s)
{_vocabulary_lines(plan)}{_factorization_lines(svd)}
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
