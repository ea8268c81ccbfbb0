"""`smile verify`: check an output folder of `smile upscale` and list every defect, one line each.

Checks: the index against the shard files, every safetensors header, each shard's size and SHA-256 against
smile_manifest.json, the config (expert count, ranks, top-k) against the options in the manifest and against
the shape of every SmileLinear tensor, the modeling files against the tool's own (byte for byte), and finally
loading the model with transformers for one forward pass on a few tokens. Foreign modeling code is never
run: the model is loaded only when its modeling files are exactly the tool's.
"""

from __future__ import annotations

import json
from pathlib import Path

from smile_cli.errors import InputError
from smile_cli.output import MANIFEST_NAME, MODELING_DIR, MODELING_FILES, PARTIAL_MANIFEST_NAME
from smile_cli.sources import TensorInfo, read_safetensors_header
from smile_cli.staging import file_sha256
from smile_cli.writer import INDEX_NAME


class Report:
    def __init__(self):
        self.defects: list[str] = []
        self.checks: list[str] = []
        self.skipped: list[str] = []

    def check(self, name: str, defects: list[str]) -> bool:
        self.checks.append(name)
        self.defects.extend(defects)
        return not defects


def verify_folder(folder: Path, *, load: bool = True) -> dict:
    """{'folder', 'ok', 'defects', 'checks', 'skipped'} for an output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    report = Report()
    config = _read_json(folder / "config.json", report, "config.json")
    manifest = _read_json(folder / MANIFEST_NAME, report, MANIFEST_NAME)
    tensors: dict[str, TensorInfo] = {}
    report.check("index and headers", _check_weights(folder, tensors))
    if manifest is not None:
        report.check("shard checksums", _check_shards(folder, manifest))
    if (folder / PARTIAL_MANIFEST_NAME).exists():
        report.defects.append(f"{PARTIAL_MANIFEST_NAME}: the journal of an unfinished run is present")
    if config is not None:
        report.check("config", _check_config(config, manifest))
        report.check("tensor shapes", _check_tensors(config, tensors))
    modeling_ok = report.check("modeling files", _check_modeling(folder, config))
    if not load:
        report.skipped.append("forward pass (--no-load)")
    elif not modeling_ok or config is None:
        report.skipped.append("forward pass: the modeling files are not smile's own, and foreign code is never run")
    else:
        report.check("forward pass", _check_forward(folder, config))
    return {
        "folder": str(folder),
        "ok": not report.defects,
        "defects": report.defects,
        "checks": report.checks,
        "skipped": report.skipped,
    }


def _read_json(path: Path, report: Report, what: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        report.defects.append(f"{what}: missing")
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.defects.append(f"{what}: not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        report.defects.append(f"{what}: not a JSON object")
        return None
    return data


def _check_weights(folder: Path, tensors: dict[str, TensorInfo]) -> list[str]:
    """Headers of every shard; with an index, every entry is in its file and every tensor in the index."""
    defects = []
    index_path = folder / INDEX_NAME
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    weight_map = None
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            return [f"{INDEX_NAME}: malformed ({e})"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        if name not in present:
            defects.append(f"{name}: missing" + (f" (named in {INDEX_NAME})" if weight_map else ""))
            continue
        try:
            file_tensors, _ = read_safetensors_header(folder / name)
        except InputError as e:
            defects.append(str(e))
            continue
        tensors.update(file_tensors)
        if weight_map is not None:
            for tensor in file_tensors:
                if weight_map.get(tensor) != name:
                    defects.append(f"tensor '{tensor}' in {name} is not in {INDEX_NAME}")
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if name in present and tensor not in tensors:
                defects.append(f"tensor '{tensor}' named in {INDEX_NAME} is missing from {name}")
    defects += [f"{name}: not part of the model (not in {INDEX_NAME})" for name in present if name not in files]
    return defects


def _check_shards(folder: Path, manifest: dict) -> list[str]:
    defects = []
    records = manifest.get("shards") or []
    recorded = {r.get("name") for r in records}
    for record in records:
        path = folder / str(record.get("name"))
        if not path.is_file():
            defects.append(f"{path.name}: listed in {MANIFEST_NAME} but missing")
        elif path.stat().st_size != record.get("size"):
            defects.append(f"{path.name}: {path.stat().st_size} bytes, the manifest says {record.get('size')}")
        elif file_sha256(path) != record.get("sha256"):
            defects.append(f"{path.name}: SHA-256 does not match {MANIFEST_NAME} (the file was altered)")
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in recorded:
            defects.append(f"{path.name}: not listed in {MANIFEST_NAME}")
    return defects


def _check_config(config: dict, manifest: dict | None) -> list[str]:
    defects = []
    ints = {k: config.get(k) for k in ("num_local_experts", "num_experts_per_tok", "rank_of_router", "rank_of_expert")}
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            defects.append(f"config.json: {key} is {value!r}, not a non-negative integer")
    if defects:
        return defects
    experts, top_k = ints["num_local_experts"], ints["num_experts_per_tok"]
    if experts < 1 or not 1 <= top_k <= experts:
        defects.append(f"config.json: num_experts_per_tok {top_k} is not within 1..num_local_experts ({experts})")
    if experts > 1 and ints["rank_of_router"] < 1:
        defects.append("config.json: rank_of_router must be at least 1 with several experts")
    if not str(config.get("model_type", "")).startswith("smile_"):
        defects.append(f"config.json: model_type {config.get('model_type')!r} is not a smile_ type")
    options = (manifest or {}).get("options")
    if isinstance(options, dict):
        expert_rank = 0 if options.get("expert_rank") == "full" else options.get("expert_rank")
        expected = {
            "num_local_experts": len(options.get("experts") or []),
            "num_experts_per_tok": options.get("top_k"),
            "rank_of_router": options.get("router_rank"),
            "rank_of_expert": expert_rank,
        }
        auto = [key for key, want in expected.items() if want == "auto"]
        if auto and not isinstance(config.get("smile_ranks"), dict):
            defects.append("config.json: smile_ranks is missing, the manifest's options allocate ranks (auto)")
        for key, want in expected.items():
            if want == "auto":  # per module, in smile_ranks (checked against the tensors)
                continue
            if ints[key] != want:
                defects.append(f"config.json: {key} is {ints[key]}, the manifest's options imply {want}")
        routing, want = config.get("smile_routing", "faithful"), options.get("routing", "faithful")
        if routing != want:
            defects.append(f"config.json: smile_routing is {routing!r}, the manifest's options imply {want!r}")
    return defects


def _check_tensors(config: dict, tensors: dict[str, TensorInfo]) -> list[str]:
    """Every SmileLinear's tensors have the names, shapes and dtypes that the config implies."""
    from smile_cli.plan import LinearPlan, LinearRanks, linear_outputs

    try:
        targets = [str(t) for t in config["smile_target_modules"]]
        ranks = {target: LinearRanks.of_config(config, target) for target in targets}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return [f"config.json: missing or malformed SMILE field ({e!r})"]
    defects = []
    modules = sorted(n.removesuffix(".shared_linear.weight") for n in tensors if n.endswith(".shared_linear.weight"))
    for target in targets:
        if target not in modules:
            defects.append(f"no SmileLinear tensors for '{target}' (listed in smile_target_modules)")
    for module in sorted(set(modules) - set(targets)):
        defects.append(f"SmileLinear tensors for '{module}', which smile_target_modules does not list")
    for module in modules:
        weight = tensors[module + ".shared_linear.weight"]
        if len(weight.shape) != 2:
            defects.append(f"tensor '{module}.shared_linear.weight' has shape {list(weight.shape)}, not 2-D")
            continue
        lin = LinearPlan(module, weight.shape[0], weight.shape[1], module + ".shared_linear.bias" in tensors)
        if module not in ranks:
            continue
        expected = list(linear_outputs(lin, ranks[module], weight.dtype))
        for name, shape, dtype in expected:
            info = tensors.get(name)
            if info is None:
                defects.append(f"tensor '{name}' is missing")
            elif info.shape != tuple(shape) or info.dtype != dtype:
                defects.append(
                    f"tensor '{name}' is {list(info.shape)} {info.dtype}, the config implies {list(shape)} {dtype}"
                )
        names = {name for name, _, _ in expected}
        for name in tensors:
            if name.startswith(module + ".") and name not in names:
                defects.append(f"tensor '{name}' is not a parameter of a SmileLinear with this config")
    return defects


def _check_modeling(folder: Path, config: dict | None) -> list[str]:
    defects = []
    for name in MODELING_FILES:
        path = folder / name
        if not path.is_file():
            defects.append(f"{name}: missing")
        elif path.read_bytes() != (MODELING_DIR / name).read_bytes():
            defects.append(f"{name}: differs from the modeling code of this smile version")
    for key, target in ((config or {}).get("auto_map") or {}).items():
        local = {name.removesuffix(".py") for name in MODELING_FILES}
        if not isinstance(target, str) or "--" in target or target.split(".")[0] not in local:
            defects.append(f"config.json: auto_map {key} points at {target!r}, not at the files in this folder")
    return defects


def _check_forward(folder: Path, config: dict) -> list[str]:
    import torch
    import transformers

    auto_map = config.get("auto_map") or {}
    auto_name = next((a for a in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM") if a in auto_map), "AutoModel")
    try:
        model, info = getattr(transformers, auto_name).from_pretrained(
            folder, trust_remote_code=True, output_loading_info=True, dtype=torch.float32
        )
    except Exception as e:  # noqa: BLE001 - any failure to load is a defect to report
        return [f"the model does not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    defects = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        values = sorted(map(str, info.get(key) or []))
        if values:
            defects.append(f"loading: {key.replace('_', ' ')}: {', '.join(values[:5])}" + (" ..." * (len(values) > 5)))
    try:
        with torch.no_grad():
            output = model.eval()(**_dummy_inputs(model.config))
    except Exception as e:  # noqa: BLE001
        return [*defects, f"forward pass fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    result = output.logits if getattr(output, "logits", None) is not None else output[0]
    if not torch.isfinite(result).all():
        defects.append("forward pass: the outputs hold NaN/Inf")
    return defects


def _dummy_inputs(config) -> dict:
    """A few tokens (and decoder tokens for encoder-decoders), or one image for vision encoders."""
    import torch

    if getattr(config, "vocab_size", None):
        ids = torch.arange(8).remainder(int(config.vocab_size))[None]
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if config.is_encoder_decoder else {"input_ids": ids}
    size = int(getattr(config, "image_size", 224))
    return {"pixel_values": torch.zeros(1, int(getattr(config, "num_channels", 3)), size, size)}
