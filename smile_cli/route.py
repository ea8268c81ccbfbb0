"""`smile route`: which expert each upscaled layer picks for each token of a prompt, or each patch of an image, and
with what weight.

The model is loaded as written (its own modeling file, trust_remote_code) through the Auto class of its base
architecture (AutoModelForCausalLM, AutoModelForSeq2SeqLM for T5, AutoModel for CLIP's vision tower, ...); the
routing weights of every SmileLinear are observed with the model's routing hook (register_routing_hook) while each
input runs through it once (teacher-forced, no generation). What the input is follows the base architecture's
main_input_name: input_ids (text prompts, read with the folder's tokenizer) or pixel_values (image files, read with
Pillow and preprocessed by the image processor the output copied from its base, preprocessor_config.json; the
positions reported are the class token, CLS, then the patches row by row, patch0, patch1, ...). Encoder-decoder
models report the encoder's layers (the prompt's tokens). Prompts for an image model, images for a text model, an
unreadable image, a missing preprocessor_config.json or tokenizer, or Pillow missing: one line, exit 2 (InputError),
before the model is loaded. So is a folder that is not what smile upscale wrote: its code not exactly smile's own
(trust.check_own_code: foreign code is never imported), a config.json, index or shard header that cannot be read, a
shard missing, a file that is not a regular file (inputs.local.open_checkpoint reads them all before the model is
loaded).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from smile_cli.errors import InputError
from smile_cli.files import JSON_ERRORS, load_json
from smile_cli.naming import layer_index

TEXT, IMAGES = "input_ids", "pixel_values"  # the base architectures' main_input_name that smile route reads


def read_config(model_dir: Path) -> dict:
    """config.json of the SMILE model in model_dir (InputError if it is not one, or if loading it would import any
    code but smile's own: trust.check_own_code)."""
    from smile_cli.files import check_folder_files, regular_file
    from smile_cli.inputs.checks import read_json_object
    from smile_cli.trust import check_own_code

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such folder")
    check_folder_files(model_dir, str(model_dir))
    if not regular_file(model_dir / "config.json", str(model_dir)):
        raise InputError(f"{model_dir}: no config.json (not a model folder)")
    config = read_json_object(str(model_dir), model_dir / "config.json")
    if "num_local_experts" not in config:
        raise InputError(f"{model_dir}: not a SMILE model (its config has no num_local_experts)")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures):
        raise InputError(f"{model_dir}: config.json's architectures is {architectures!r}, not a list of class names")
    check_own_code(model_dir)
    return config


def base_input(config: dict) -> str:
    """What the base architecture (the SMILE class's transformers base) reads: its main_input_name."""
    import transformers

    architecture = (config.get("architectures") or [""])[0]
    base_class = getattr(transformers, architecture.removeprefix("Smile"), None)
    return getattr(base_class, "main_input_name", TEXT)


def check_inputs(model_dir: Path, takes: str, prompts: list[str], images: list[Path]) -> None:
    """InputError unless the inputs given are what the model reads: prompts for input_ids, images for pixel_values."""
    if takes not in (TEXT, IMAGES):
        raise _reads_neither(model_dir, takes)
    if prompts and images:
        raise InputError("give prompts (--prompt, --prompts-file) or images (--image), not both")
    if takes == IMAGES and prompts:
        raise InputError(f"{model_dir}: this model reads images (pixel_values), not text: route it with --image FILE")
    if takes == TEXT and images:
        raise InputError(f"{model_dir}: this model reads text (input_ids), not images: route it with --prompt TEXT")
    if takes == IMAGES and not images:
        raise InputError("no image given (--image FILE)")
    if takes == TEXT and not prompts:
        raise InputError("no prompt given (--prompt TEXT or --prompts-file FILE)")


def read_images(paths: list[Path]) -> list:
    """Each file as an RGB PIL image, read before the model is loaded (InputError on a file Pillow cannot read)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise InputError("--image needs Pillow: pip install pillow") from e
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except UnidentifiedImageError as e:
            raise InputError(f"{path}: not an image file Pillow can read") from e
        except OSError as e:
            raise InputError(f"{path}: cannot read the image: {e.strerror or e}") from e
    return images


def load_model(model_dir: Path):
    """The SMILE model in model_dir, in its stored dtype (no float32 copy), and what prepares its inputs: the
    tokenizer of a text model, the image processor of an image model. Refused up front (InputError) when the model
    will not fit in the available memory (memory.py)."""
    import torch
    import transformers

    from smile_cli.inputs.local import open_checkpoint
    from smile_cli.memory import check_fits

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    auto_class = _auto_class(model_dir, config)
    open_checkpoint(str(model_dir), trust_remote_code=True)  # config, index, every shard's header: one line each
    _, dtype = check_fits(model_dir, "loading the model")  # first: the refusal that says most about the machine
    processor = _processor(model_dir, base_input(config))
    loader = getattr(transformers, auto_class)
    try:
        model = loader.from_pretrained(model_dir, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(
            f"{model_dir}: the model does not load ({type(e).__name__}: {first}); `smile verify` says what is wrong"
        ) from e
    if not hasattr(model, "register_routing_hook"):
        raise InputError(f"{model_dir}: its modeling_smile.py predates the routing hook; rebuild it to route")
    return model, processor


def _processor(model_dir: Path, takes: str):
    """The base's tokenizer (text) or image processor (images), plain files copied into the output: no code of the
    folder is needed to read them."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if takes == TEXT:
        try:
            return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer files hold (tokenizers raises plain Exception)
            raise InputError(f"{model_dir}: no usable tokenizer ({type(e).__name__}: {_first_line(e)})") from e
    if takes == IMAGES:
        if not (model_dir / "preprocessor_config.json").is_file():
            raise InputError(
                f"{model_dir}: no preprocessor_config.json (the base's image processor, copied by smile upscale "
                "when the base has one): copy the base's into the folder"
            )
        try:
            return AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - whatever the processor's config holds
            raise InputError(f"{model_dir}: no usable image processor ({type(e).__name__}: {_first_line(e)})") from e
    raise _reads_neither(model_dir, takes)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _reads_neither(model_dir: Path, takes: str) -> InputError:
    return InputError(f"{model_dir}: smile route reads text prompts or images; this model takes {takes}")


def _auto_class(model_dir: Path, config: dict) -> str:
    """The Auto class of config.json's auto_map that loads the architecture the output was built as (read_config
    checked that every entry names smile's own classes)."""
    architectures = config.get("architectures") or []
    auto_map = config.get("auto_map") or {}
    for auto, target in auto_map.items():
        if architectures and target.endswith("." + architectures[0]) and auto != "AutoConfig":
            return auto
    raise InputError(f"{model_dir}: config.json's auto_map names no model class for {architectures or 'it'}")


def expert_names(model_dir: Path, num_experts: int) -> list[str]:
    """Expert labels from the output's manifest (their refs), else expert0, expert1, ..."""
    try:
        manifest = load_json(Path(model_dir) / "smile_manifest.json")
        refs = manifest["options"]["experts"]
        if len(refs) == num_experts:
            return [Path(r).name or r for r in refs]
    except (*JSON_ERRORS, KeyError, TypeError):
        pass
    return [f"expert{i}" for i in range(num_experts)]


def route_prompts(model, tokenizer, prompts: list[str]) -> list[dict]:
    """For each prompt: its tokens and, per SmileLinear, the chosen (top-weighted) expert and weight per token."""
    records = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        layers = _routing(model, {"input_ids": ids})
        records.append(_record("prompt", prompt, tokenizer.convert_ids_to_tokens(ids[0].tolist()), layers))
    return records


def route_images(model, image_processor, paths: list[Path], images: list) -> list[dict]:
    """For each image (preprocessed as the base's image processor does): its positions (CLS, patch0, ...) and, per
    SmileLinear, the chosen (top-weighted) expert and weight per position."""
    records = []
    for path, image in zip(paths, images, strict=True):
        pixels = image_processor(images=image, return_tensors="pt")["pixel_values"].to(model.dtype)
        layers = _routing(model, {"pixel_values": pixels})
        positions = next(iter(layers.values())).shape[0]
        records.append(_record("image", str(path), patch_labels(positions, model.config), layers))
    return records


def patch_labels(positions: int, config) -> list[str]:
    """Names of a vision encoder's positions: CLS then patch0, patch1, ... (row by row) when there is one more
    position than the image has patches, patch0, ... when as many; pos0, pos1, ... otherwise."""
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    patches = (image_size // patch_size) ** 2 if isinstance(image_size, int) and isinstance(patch_size, int) else -1
    if positions in (patches, patches + 1):
        return ["CLS"] * (positions - patches) + [f"patch{i}" for i in range(patches)]
    return [f"pos{i}" for i in range(positions)]


def _routing(model, inputs: dict) -> dict:
    """Per reported SmileLinear, its (positions, experts) routing weights in one forward pass of inputs (batch 1)."""
    import torch

    # The layers reported: all of a decoder-only model's or an encoder's; an encoder-decoder's encoder layers only
    # (its decoder routes its own step, and its cross-attention k and v, which read the encoder's states, belong to
    # the decoder).
    reported = None
    if model.config.is_encoder_decoder:  # one decoder step; the encoder's layers see the input
        encoder = {id(m) for m in model.get_encoder().modules()}
        reported = {name for name, m in model.named_modules() if id(m) in encoder}
        inputs = {**inputs, "decoder_input_ids": torch.full((1, 1), model.config.decoder_start_token_id)}
    captured: dict[str, torch.Tensor] = {}
    handle = model.register_routing_hook(lambda name, weights: captured.__setitem__(name, weights.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    layers = {n: w.reshape(-1, w.shape[-1]) for n, w in captured.items() if reported is None or n in reported}
    if not layers:
        raise InputError("the model has no routed SmileLinear layers (one expert, or no router)")
    return layers


def _record(kind: str, label: str, tokens: list[str], layers: dict) -> dict:
    routing = []
    for name, weights in layers.items():
        top_weight, top_expert = weights.max(dim=-1)
        routing.append(
            {"module": name, "expert": top_expert.tolist(), "weight": [round(w, 4) for w in top_weight.tolist()]}
        )
    return {kind: label, "tokens": tokens, "layers": routing}


def layer_of(module: str) -> str:
    """The decoder layer a module belongs to (model.layers.3.mlp.up_proj -> '3'), or the module name itself."""
    index = layer_index(module)
    return module if index is None else str(index)


def summarise(record: dict, num_experts: int) -> list[dict]:
    """Per layer: the share of (token or position, projection) decisions that went to each expert."""
    by_layer: dict[str, Counter] = {}
    for entry in record["layers"]:
        by_layer.setdefault(layer_of(entry["module"]), Counter()).update(entry["expert"])
    rows = []
    for layer, counts in by_layer.items():
        total = sum(counts.values())
        rows.append({"layer": layer, "share": [round(counts[i] / total, 4) for i in range(num_experts)]})
    return rows


def route(model_dir: Path, prompts: list[str], images: list[Path] = ()) -> dict:
    """Everything `smile route --json` prints: the routing of each prompt (key prompts), or of each image (images)."""
    takes = base_input(read_config(model_dir))
    check_inputs(model_dir, takes, prompts, list(images))
    pictures = read_images(images) if takes == IMAGES else None
    model, processor = load_model(model_dir)
    num_experts = model.config.num_local_experts
    if takes == IMAGES:
        key, records = "images", route_images(model, processor, images, pictures)
    else:
        key, records = "prompts", route_prompts(model, processor, prompts)
    for record in records:
        record["summary"] = summarise(record, num_experts)
    return {"model": str(model_dir), "experts": expert_names(model_dir, num_experts), key: records}


def routed_inputs(report: dict) -> list[tuple[str, dict]]:
    """(label, record) for each input of a report: the prompt, or the image's path."""
    if "images" in report:
        return [(record["image"], record) for record in report["images"]]
    return [(record["prompt"], record) for record in report["prompts"]]


def plot(report: dict, path: Path) -> None:
    """Heatmap per prompt or image: upscaled layers (rows) x tokens or positions (columns), coloured by the chosen
    expert."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'smile-cli[plot]'") from e
    experts = report["experts"]
    inputs = routed_inputs(report)
    colours = ListedColormap(plt.get_cmap("tab10").colors[: len(experts)])
    heights = [max(3.0, 0.12 * len(record["layers"]) + 1.5) for _, record in inputs]
    figure, axes = plt.subplots(
        len(inputs),
        1,
        figsize=(max(6.0, 0.35 * max(len(record["tokens"]) for _, record in inputs) + 3), sum(heights)),
        squeeze=False,
    )
    for axis, (label, record) in zip(axes[:, 0], inputs, strict=True):
        grid = [entry["expert"] for entry in record["layers"]]
        axis.imshow(grid, aspect="auto", cmap=colours, vmin=-0.5, vmax=len(experts) - 0.5, interpolation="nearest")
        axis.set_xticks(range(len(record["tokens"])), record["tokens"], fontsize=7, rotation=90)
        step = max(1, len(grid) // 16)
        axis.set_yticks(range(0, len(grid), step), [e["module"] for e in record["layers"]][::step], fontsize=6)
        axis.set_title(label[:80], fontsize=9)
    handles = [Patch(color=colours(i), label=name) for i, name in enumerate(experts)]
    figure.legend(handles=handles, loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
