"""`smile verify`: check an output folder of `smile upscale` and list every defect, one line each.

Checks: the index against the shard files, every safetensors header, each shard's size and SHA-256 against
smile_manifest.json, the config (expert count, ranks, top-k) against the options in the manifest and against
the shape of every SmileLinear tensor, the modeling files against the tool's own (byte for byte); then, with fixed
memory whatever the model's size, every tensor's values (no NaN/Inf, read one tensor at a time from the shards) and
a forward pass of every SmileLinear on its own (built from its tensors, one module at a time, on a few random inputs,
against the SMILE formula computed here independently in float64); and finally the whole model loaded with
transformers in its stored dtype for one forward pass on a few tokens, only when that fits the memory budget
(`max_memory`, default half the available memory). The report says how each check was made, and why a check was
skipped. Foreign code is never run: modules and model are built only when the folder carries no code but the tool's
own (trust.foreign_code, the rule every command that loads a folder applies: the modeling files byte for byte, no
other Python file, config.json's auto_map at them, no tokenizer or processor auto_map); each departure is a defect.
A file the checks read that is not a regular file (a FIFO, a device) is refused before anything is opened (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from smile_cli.errors import InputError
from smile_cli.files import JSON_ERRORS, check_folder_files, load_json
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.checks import all_finite
from smile_cli.inputs.safetensors_format import INDEX_NAME, TensorInfo, read_safetensors_header
from smile_cli.memory import RUNTIME_BYTES, available_memory, folder_weights, gb
from smile_cli.naming import natural_key
from smile_cli.output import MANIFEST_NAME, PARTIAL_MANIFEST_NAME
from smile_cli.staging import file_sha256
from smile_cli.trust import foreign_code

# a module whose float64 copy is larger than this is checked in float32 (dense experts of large layers)
FLOAT64_MODULE_BYTES = 2**30
LAYER_INPUTS = 4  # random input rows per SmileLinear
# largest relative difference (max |y - y_formula| / max |y_formula|) accepted, by the dtype the module ran in
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
# tokens whose k-th and (k+1)-th routing probabilities are closer than this are left out of the comparison: the
# module routes in float32, the formula in float64, and either choice is right there
ROUTING_TIE = 1e-5


class Report:
    def __init__(self):
        self.defects: list[str] = []
        self.checks: list[str] = []
        self.how: dict[str, str] = {}
        self.skipped: list[str] = []

    def check(self, name: str, defects: list[str], how: str = "") -> bool:
        self.checks.append(name)
        if how:
            self.how[name] = how
        self.defects.extend(defects)
        return not defects


def verify_folder(folder: Path, *, load: bool = True, max_memory: int | None = None) -> dict:
    """{'folder', 'ok', 'defects', 'checks', 'how', 'skipped', 'memory'} for an output folder.

    load: run forward passes (per SmileLinear, and of the whole model when it fits); max_memory: the bytes the
    whole-model pass may use (weights in their stored dtype plus the runtime), default half the available memory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    check_folder_files(folder, str(folder))
    report = Report()
    config = _read_json(folder / "config.json", report, "config.json")
    manifest = _read_json(folder / MANIFEST_NAME, report, MANIFEST_NAME)
    tensors: dict[str, TensorInfo] = {}
    headers_ok = report.check(
        "index and headers",
        _check_weights(folder, tensors),
        "every shard's safetensors header read (not its data); the index and the shards name the same tensors",
    )
    if manifest is not None:
        report.check(
            "shard checksums",
            _check_shards(folder, manifest),
            f"size and SHA-256 of every shard (streamed) against {MANIFEST_NAME}",
        )
    if (folder / PARTIAL_MANIFEST_NAME).exists():
        report.defects.append(f"{PARTIAL_MANIFEST_NAME}: the journal of an unfinished run is present")
    shapes_ok = False
    if config is not None:
        report.check("config", _check_config(config, manifest), "expert count, ranks, top-k, routing vs the manifest")
        shapes_ok = report.check(
            "tensor shapes",
            _check_tensors(config, tensors),
            "names, shapes and dtypes of every SmileLinear tensor, from the headers, against the config's ranks",
        )
    modeling_ok = report.check(
        "modeling files",
        foreign_code(folder),
        "modeling and configuration files byte for byte against this smile version's; auto_map points at them; no "
        "other Python file, no tokenizer or processor code (auto_map)",
    )
    reader = Checkpoint(str(folder), folder, config or {}, tensors)
    report.check(
        "tensor values",
        _check_values(reader, tensors),
        "every tensor read from the shards one at a time (no memory map), no NaN or Inf",
    )
    memory = {"whole_model_bytes": sum(info.nbytes for info in tensors.values()) + RUNTIME_BYTES}
    if not load:
        report.skipped.append("layer forward passes (--no-load)")
        report.skipped.append("forward pass (--no-load)")
    elif not modeling_ok or config is None:
        foreign = "the folder carries code that is not smile's own (see the defects), and foreign code is never run"
        report.skipped.append(f"layer forward passes: {foreign}")
        report.skipped.append(f"forward pass: {foreign}")
    else:
        if shapes_ok:
            defects, how = _check_layers(reader, config)
            report.check("layer forward passes", defects, how)
        else:
            report.skipped.append("layer forward passes: the SmileLinear tensors do not match the config")
        if headers_ok:
            _whole_model(folder, config, report, memory, max_memory)
        else:
            report.skipped.append("forward pass: the index or a shard's header is not sound")
    return {
        "folder": str(folder),
        "ok": not report.defects,
        "defects": report.defects,
        "checks": report.checks,
        "how": report.how,
        "skipped": report.skipped,
        "memory": memory,
    }


def _whole_model(folder: Path, config: dict, report: Report, memory: dict, max_memory: int | None) -> None:
    """The whole-model forward pass, when loading the model fits max_memory and the available memory."""
    need = memory["whole_model_bytes"]
    available, source = available_memory()
    budget = max_memory if max_memory is not None else available // 2
    memory.update(budget_bytes=budget, available_bytes=available, available_source=source)
    default = "" if max_memory is not None else " (default: half the available memory)"
    if need > budget or need > available:
        why = f"over --max-memory {gb(budget)}{default}" if need > budget else f"over the {gb(available)} available"
        report.skipped.append(
            f"forward pass: loading the whole model needs about {gb(need)}, {why}; each SmileLinear was checked "
            "on its own instead (layer forward passes)"
        )
        return
    defects, dtype = _check_forward(folder, config)
    report.check(
        "forward pass",
        defects,
        f"the whole model loaded with transformers in its stored dtype ({dtype}), one forward pass on a few tokens, "
        f"outputs finite (about {gb(need)}, within --max-memory {gb(budget)}{default})",
    )


def _read_json(path: Path, report: Report, what: str) -> dict | None:
    try:
        data = load_json(path)
    except FileNotFoundError:
        report.defects.append(f"{what}: missing")
        return None
    except JSON_ERRORS as e:
        report.defects.append(f"{what}: not valid JSON ({type(e).__name__}: {str(e)[:200]})")
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
            weight_map = load_json(index_path)["weight_map"]
            assert isinstance(weight_map, dict)
        except (*JSON_ERRORS, KeyError, TypeError, AssertionError) as e:
            return [f"{INDEX_NAME}: malformed ({type(e).__name__}: {str(e)[:200]})"]
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
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return [f"{MANIFEST_NAME}: shards is not a list of records"]
    recorded = {r.get("name") for r in records}
    for record in records:
        if "/" in str(record.get("name")) or str(record.get("name")).startswith(".."):
            defects.append(f"{MANIFEST_NAME}: shard name {record.get('name')!r} lies outside the folder")
            continue
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
    if isinstance(options, dict) and not isinstance(options.get("experts") or [], list):
        defects.append(f"{MANIFEST_NAME}: options.experts is not a list")
    elif isinstance(options, dict):
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
    from smile_cli.plan import SHARED_BIAS, SHARED_WEIGHT, LinearPlan, LinearRanks, linear_outputs

    try:
        targets = [str(t) for t in config["smile_target_modules"]]
        ranks = {target: LinearRanks.of_config(config, target) for target in targets}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return [f"config.json: missing or malformed SMILE field ({e!r})"]
    defects = []
    modules = sorted(n.removesuffix("." + SHARED_WEIGHT) for n in tensors if n.endswith("." + SHARED_WEIGHT))
    for target in targets:
        if target not in modules:
            defects.append(f"no SmileLinear tensors for '{target}' (listed in smile_target_modules)")
    for module in sorted(set(modules) - set(targets)):
        defects.append(f"SmileLinear tensors for '{module}', which smile_target_modules does not list")
    for module in modules:
        weight = tensors[f"{module}.{SHARED_WEIGHT}"]
        if len(weight.shape) != 2:
            defects.append(f"tensor '{module}.{SHARED_WEIGHT}' has shape {list(weight.shape)}, not 2-D")
            continue
        lin = LinearPlan(module, weight.shape[0], weight.shape[1], f"{module}.{SHARED_BIAS}" in tensors)
        if module not in ranks:
            continue
        expected = list(linear_outputs(lin, ranks[module], weight.dtype, bool(config.get("smile_calibrated_routers"))))
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


def _check_values(reader: Checkpoint, tensors: dict[str, TensorInfo]) -> list[str]:
    defects = []
    for name in sorted(tensors, key=natural_key):
        try:
            tensor = reader.read(name)
        except InputError as e:
            defects.append(str(e))
            continue
        if tensor.dtype.is_floating_point and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            defects.append(f"tensor '{name}' holds {bad} NaN or Inf values")
    return defects


def _check_layers(reader: Checkpoint, config: dict) -> tuple[list[str], str]:
    """Each SmileLinear built on its own from its tensors (read one module at a time), run on random inputs, against
    smile_formula in float64; (defects, how it was checked)."""
    from smile_cli.modeling.modeling_smile import SmileLinear
    from smile_cli.plan import SHARED_BIAS, SHARED_WEIGHT, LinearRanks

    generator = torch.Generator().manual_seed(0)
    modules = sorted((str(m) for m in config["smile_target_modules"]), key=natural_key)
    num_experts, top_k = int(config["num_local_experts"]), int(config["num_experts_per_tok"])
    defects, worst, ties, in_float32 = [], 0.0, 0, 0
    for module in modules:
        ranks = LinearRanks.of_config(config, module)
        names = [n for n in reader.tensors if n.startswith(module + ".")]
        params = {n.removeprefix(module + "."): reader.read(n) for n in names}
        weight = params[SHARED_WEIGHT]
        nbytes = sum(p.numel() for p in params.values()) * 8
        dtype = torch.float64 if nbytes <= FLOAT64_MODULE_BYTES else torch.float32
        in_float32 += dtype == torch.float32
        params = {k: v.to(dtype) for k, v in params.items()}
        experts = list(ranks.experts) if ranks.experts[0] else 0
        with torch.device("meta"):
            layer = SmileLinear(
                in_features=weight.shape[1],
                out_features=weight.shape[0],
                bias=SHARED_BIAS in params,
                num_experts=num_experts,
                top_k=top_k,
                rank_of_router=ranks.router,
                rank_of_expert=experts,
                calibrated=bool(config.get("smile_calibrated_routers")),
            )
        try:
            layer.load_state_dict(params, strict=True, assign=True)
            x = torch.randn(LAYER_INPUTS, weight.shape[1], generator=generator, dtype=torch.float64).to(dtype)
            with torch.no_grad():
                y = layer.eval()(x).double()
        except Exception as e:  # noqa: BLE001 - any failure of the module is a defect to report
            reason = str(e).splitlines()[0] if str(e) else ""
            defects.append(f"SmileLinear '{module}' fails: {type(e).__name__}: {reason}")
            continue
        expected, kept = smile_formula(x.double(), params, num_experts, top_k, ranks)
        ties += int((~kept).sum())
        scale = float(expected[kept].abs().max()) if kept.any() else 0.0
        error = float((y[kept] - expected[kept]).abs().max()) / scale if scale > 0 else 0.0
        worst = max(worst, error)
        if not error <= TOLERANCE[dtype]:
            defects.append(
                f"SmileLinear '{module}': its forward pass differs from the SMILE formula by {error:.2e} "
                f"(relative; at most {TOLERANCE[dtype]:.0e} expected)"
            )
        del params, layer
    precision = "float64" if not in_float32 else f"float64 ({in_float32} large module(s) in float32)"
    how = (
        f"each of the {len(modules)} SmileLinear modules built on its own from its tensors in {precision}, one "
        f"module in memory at a time, on {LAYER_INPUTS} random inputs, against the SMILE formula computed "
        f"independently (paper's router, top-{top_k}); largest relative difference {worst:.1e}"
        + (f"; {ties} input(s) at a routing tie left out" if ties else "")
    )
    return defects, how


def smile_formula(x, params: dict, num_experts: int, top_k: int, ranks) -> tuple:
    """y = W0 x + b0 + sum over the top-k experts i of p_i (u_i svh_i x + bias_i) (or dW_i x for dense experts),
    p = the renormalised top-k of softmax_i ||R_i x||, all in float64, one expert at a time; and which rows of x are
    clear of a routing tie. x: (n, in); params: a SmileLinear's tensors by their names in the module."""
    p = {k: v.double() for k, v in params.items()}
    weight = p["shared_linear.weight"]
    out_features = weight.shape[0]
    y = x @ weight.T
    if "shared_linear.bias" in p:
        y = y + p["shared_linear.bias"]
    kept = torch.ones(x.shape[0], dtype=torch.bool)
    if num_experts == 1:
        weights = torch.ones(x.shape[0], 1, dtype=torch.float64)
    else:
        logits = (x @ p["router.weight"].T).view(x.shape[0], num_experts, ranks.router).norm(dim=-1)
        probs = logits.softmax(dim=-1)
        ordered = probs.sort(dim=-1, descending=True).values
        weights = torch.zeros_like(probs)
        if top_k < num_experts:
            kept = (ordered[:, top_k - 1] - ordered[:, top_k]) > ROUTING_TIE
        for row in range(x.shape[0]):
            chosen = probs[row].argsort(descending=True)[:top_k]
            weights[row, chosen] = probs[row, chosen] / probs[row, chosen].sum()
    start = 0
    for i in range(num_experts):
        if ranks.experts[0]:
            rows = slice(start, start + ranks.experts[i])
            start = rows.stop
            update = (x @ p["experts_svh"][rows].T) @ p["experts_u"][:, rows].T
        else:
            update = x @ p["experts_delta"][i * out_features : (i + 1) * out_features].T
        if "experts_bias" in p:
            update = update + p["experts_bias"][i]
        y = y + weights[:, i : i + 1] * update
    return y, kept


def _check_forward(folder: Path, config: dict) -> tuple[list[str], str]:
    """Load the whole model in its stored dtype and run it once: (defects, the dtype)."""
    import transformers

    _, dtype = folder_weights(folder)
    auto_map = config.get("auto_map") or {}
    auto_name = next((a for a in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM") if a in auto_map), "AutoModel")
    try:
        model, info = getattr(transformers, auto_name).from_pretrained(
            folder, trust_remote_code=True, output_loading_info=True, dtype=getattr(torch, dtype)
        )
    except Exception as e:  # noqa: BLE001 - any failure to load is a defect to report
        return [f"the model does not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"], dtype
    defects = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        values = sorted(map(str, info.get(key) or []))
        if values:
            defects.append(f"loading: {key.replace('_', ' ')}: {', '.join(values[:5])}" + (" ..." * (len(values) > 5)))
    try:
        with torch.no_grad():
            output = model.eval()(**_dummy_inputs(model.config, model.dtype))
    except Exception as e:  # noqa: BLE001
        failure = f"forward pass fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return [*defects, failure], dtype
    result = output.logits if getattr(output, "logits", None) is not None else output[0]
    if not torch.isfinite(result).all():
        defects.append("forward pass: the outputs hold NaN/Inf")
    return defects, dtype


def _dummy_inputs(config, dtype) -> dict:
    """A few tokens (and decoder tokens for encoder-decoders), or one image for vision encoders."""
    if getattr(config, "vocab_size", None):
        ids = torch.arange(8).remainder(int(config.vocab_size))[None]
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if config.is_encoder_decoder else {"input_ids": ids}
    size = int(getattr(config, "image_size", 224))
    return {"pixel_values": torch.zeros(1, int(getattr(config, "num_channels", 3)), size, size, dtype=dtype)}
