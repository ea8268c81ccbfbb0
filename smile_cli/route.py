"""`smile route`: which expert each upscaled layer picks for each token of a prompt, and with what weight.

The model is loaded as written (its own modeling file, trust_remote_code) through the Auto class of its base
architecture (AutoModelForCausalLM, AutoModelForSeq2SeqLM for T5, ...); the routing weights of every SmileLinear
are observed with the model's routing hook (register_routing_hook) while the prompt runs through it once
(teacher-forced, no generation). Encoder-decoder models report the encoder's layers (the prompt's tokens).
A model that does not read token ids (CLIP's vision tower reads pixel_values) is refused before anything is loaded,
with one line ("smile route reads text prompts; this model takes pixel_values") and exit 2 (InputError).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from smile_cli.errors import InputError


def load_model(model_dir: Path):
    """The SMILE model in model_dir, in its stored dtype (no float32 copy), and its tokenizer. Refused up front
    (InputError) when the model will not fit in the available memory (memory.py)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from smile_cli.memory import check_fits

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: no config.json (not a model folder)")
    config = json.loads((model_dir / "config.json").read_text())
    if "num_local_experts" not in config:
        raise InputError(f"{model_dir}: not a SMILE model (its config has no num_local_experts)")
    auto_class = _auto_class(model_dir, config)
    _check_reads_text(model_dir, config)
    _, dtype = check_fits(model_dir, "loading the model")
    try:  # the tokenizer is the base's, plain files: no code of the folder is needed to read it
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: no usable tokenizer ({str(e).splitlines()[0]})") from e
    loader = getattr(transformers, auto_class)
    model = loader.from_pretrained(model_dir, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    if not hasattr(model, "register_routing_hook"):
        raise InputError(f"{model_dir}: its modeling_smile.py predates the routing hook; rebuild it to route")
    return model, tokenizer


def _auto_class(model_dir: Path, config: dict) -> str:
    """The Auto class of config.json's auto_map that loads the architecture the output was built as."""
    architectures = config.get("architectures") or []
    auto_map = config.get("auto_map") or {}
    for auto, target in auto_map.items():
        if architectures and target.endswith("." + architectures[0]) and auto != "AutoConfig":
            return auto
    raise InputError(f"{model_dir}: config.json's auto_map names no model class for {architectures or 'it'}")


def _check_reads_text(model_dir: Path, config: dict) -> None:
    """InputError unless the base architecture (the SMILE class's transformers base) reads input_ids."""
    import transformers

    architecture = (config.get("architectures") or [""])[0]
    base_class = getattr(transformers, architecture.removeprefix("Smile"), None)
    takes = getattr(base_class, "main_input_name", "input_ids")
    if takes != "input_ids":
        raise InputError(f"{model_dir}: smile route reads text prompts; this model takes {takes}")


def expert_names(model_dir: Path, num_experts: int) -> list[str]:
    """Expert labels from the output's manifest (their refs), else expert0, expert1, ..."""
    try:
        manifest = json.loads((Path(model_dir) / "smile_manifest.json").read_text())
        refs = manifest["options"]["experts"]
        if len(refs) == num_experts:
            return [Path(r).name or r for r in refs]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        pass
    return [f"expert{i}" for i in range(num_experts)]


def route_prompts(model, tokenizer, prompts: list[str]) -> list[dict]:
    """For each prompt: its tokens and, per SmileLinear, the chosen (top-weighted) expert and weight per token."""
    import torch

    # The layers reported: all of a decoder-only model's; an encoder-decoder's encoder layers only (its decoder
    # routes its own step, and its cross-attention k and v, which read the encoder's states, belong to the decoder).
    prompt_layers = None
    if model.config.is_encoder_decoder:
        encoder = {id(m) for m in model.get_encoder().modules()}
        prompt_layers = {name for name, m in model.named_modules() if id(m) in encoder}
    captured: dict[str, torch.Tensor] = {}
    handle = model.register_routing_hook(lambda name, weights: captured.__setitem__(name, weights.detach()))
    records = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            captured.clear()
            inputs = {"input_ids": ids}
            if model.config.is_encoder_decoder:  # one decoder step; the encoder's layers see the prompt
                inputs["decoder_input_ids"] = torch.full((1, 1), model.config.decoder_start_token_id)
            with torch.no_grad():
                model(**inputs)
            layers = {
                n: w.reshape(-1, w.shape[-1])
                for n, w in captured.items()
                if prompt_layers is None or n in prompt_layers
            }
            if not layers:
                raise InputError("the model has no routed SmileLinear layers (one expert, or no router)")
            records.append(_record(prompt, tokenizer.convert_ids_to_tokens(ids[0].tolist()), layers))
    finally:
        handle.remove()
    return records


def _record(prompt, tokens, layers) -> dict:
    routing = []
    for name, weights in layers.items():
        top_weight, top_expert = weights.max(dim=-1)
        routing.append(
            {"module": name, "expert": top_expert.tolist(), "weight": [round(w, 4) for w in top_weight.tolist()]}
        )
    return {"prompt": prompt, "tokens": tokens, "layers": routing}


def layer_index(module: str) -> str:
    """The decoder layer a module belongs to (model.layers.3.mlp.up_proj -> 3), or the module name itself."""
    match = re.search(r"\.(\d+)\.", module)
    return match.group(1) if match else module


def summarise(record: dict, num_experts: int) -> list[dict]:
    """Per decoder layer: the share of (token, projection) decisions that went to each expert."""
    by_layer: dict[str, Counter] = {}
    for entry in record["layers"]:
        by_layer.setdefault(layer_index(entry["module"]), Counter()).update(entry["expert"])
    rows = []
    for layer, counts in by_layer.items():
        total = sum(counts.values())
        rows.append({"layer": layer, "share": [round(counts[i] / total, 4) for i in range(num_experts)]})
    return rows


def route(model_dir: Path, prompts: list[str]) -> dict:
    """Everything `smile route --json` prints."""
    if not prompts:
        raise InputError("no prompt given (--prompt TEXT or --prompts-file FILE)")
    model, tokenizer = load_model(model_dir)
    num_experts = model.config.num_local_experts
    records = route_prompts(model, tokenizer, prompts)
    for record in records:
        record["summary"] = summarise(record, num_experts)
    return {"model": str(model_dir), "experts": expert_names(model_dir, num_experts), "prompts": records}


def plot(report: dict, path: Path) -> None:
    """Heatmap per prompt: upscaled layers (rows) x tokens (columns), coloured by the chosen expert."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'smile-cli[plot]'") from e
    experts = report["experts"]
    prompts = report["prompts"]
    colours = ListedColormap(plt.get_cmap("tab10").colors[: len(experts)])
    heights = [max(3.0, 0.12 * len(p["layers"]) + 1.5) for p in prompts]
    figure, axes = plt.subplots(
        len(prompts),
        1,
        figsize=(max(6.0, 0.35 * max(len(p["tokens"]) for p in prompts) + 3), sum(heights)),
        squeeze=False,
    )
    for axis, record in zip(axes[:, 0], prompts, strict=True):
        grid = [entry["expert"] for entry in record["layers"]]
        axis.imshow(grid, aspect="auto", cmap=colours, vmin=-0.5, vmax=len(experts) - 0.5, interpolation="nearest")
        axis.set_xticks(range(len(record["tokens"])), record["tokens"], fontsize=7, rotation=90)
        step = max(1, len(grid) // 16)
        axis.set_yticks(range(0, len(grid), step), [e["module"] for e in record["layers"]][::step], fontsize=6)
        axis.set_title(record["prompt"][:80], fontsize=9)
    handles = [Patch(color=colours(i), label=name) for i, name in enumerate(experts)]
    figure.legend(handles=handles, loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
