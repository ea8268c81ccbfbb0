"""`smile export`: one expert of a SMILE folder as a PEFT LoRA adapter, or as a dense model of the base architecture.

The SMILE folder holds everything needed: `<m>.shared_linear.*` are the base weights of each upscaled linear,
expert I's update there is experts_u[:, I*k:(I+1)*k] @ experts_svh[I*k:(I+1)*k] (or the rows
experts_delta[I*out:(I+1)*out] for dense experts), its bias change experts_bias[I]; every other tensor is the
base's. Both exports stream tensor by tensor through the project's writer, into a staging folder moved into
place as OUT when complete (staging.py: an existing OUT, with --force, is replaced only once the new one is in, and
only when it is smile's own). Every export holds smile_manifest.json ("tool": "smile", the source, expert and kind),
written first, so that its staging folder and the finished export are recognised as smile's (--force replaces them,
nothing else). The SMILE folder must carry no code but smile's own (trust.check_own_code), though none of it is run.

- lora: r = the expert's rank, lora_A = experts_svh rows, lora_B = experts_u columns, lora_alpha = r (scale 1);
  ranks allocated per module (config smile_ranks) go into rank_pattern / alpha_pattern.
  LoRA cannot change a bias: an expert with a non-zero bias change is refused (export it as dense).
  Dense experts (rank_of_expert = 0) export as dense only.
- dense: the base plus expert I's update, under the base's own model_type and architectures (no auto_map,
  no modeling files): a plain checkpoint any engine loads.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import smile_cli
from smile_cli import defaults
from smile_cli.errors import InputError, SmileError
from smile_cli.naming import natural_key
from smile_cli.output import BASE_FILE_PATTERNS, MANIFEST_NAME
from smile_cli.plan import LinearRanks
from smile_cli.sources import Checkpoint, open_checkpoint
from smile_cli.staging import check_output_location, check_own_staging, fresh_staging, move_into_place, staging_path
from smile_cli.trust import check_own_code
from smile_cli.writer import OutputTensor, ShardedWriter, assign_shards, write_index, write_json

SMILE_CONFIG_FIELDS = ("num_local_experts", "num_experts_per_tok", "rank_of_router", "rank_of_expert", "auto_map")
SHARED = ".shared_linear."
EXPERT_TENSORS = (
    "experts_u", "experts_svh", "experts_delta", "experts_bias", "router.weight", "router.calibrated_weight",
    "router.calibrated_bias",
)  # fmt: skip
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class SmileFolder:
    checkpoint: Checkpoint
    config: dict
    modules: list[str]  # upscaled linears, in natural order
    num_experts: int

    def ranks(self, module: str) -> LinearRanks:
        return LinearRanks.of_config(self.config, module)

    @property
    def dense(self) -> bool:
        return int(self.config["rank_of_expert"]) == 0

    def read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(name)

    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def expert_update(self, module: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s weight update of module, in float32 (out x in)."""
        if not self.dense:
            rows = self.ranks(module).expert_rows(expert)
            return self.read(module + ".experts_u")[:, rows].float() @ self.read(module + ".experts_svh")[rows].float()
        out_features = self.checkpoint.tensors[module + SHARED + "weight"].shape[0]
        return self.read(module + ".experts_delta")[expert * out_features : (expert + 1) * out_features].float()


def open_smile(model_dir: Path) -> SmileFolder:
    """A SMILE folder written by `smile upscale` (its modeling code is never run: only tensors are read)."""
    checkpoint = open_checkpoint(str(model_dir), trust_remote_code=True)
    config = checkpoint.config
    if not str(config.get("model_type", "")).startswith("smile_") or "num_local_experts" not in config:
        raise InputError(f"{model_dir}: not a SMILE model folder (config.json model_type is not smile_*)")
    check_own_code(checkpoint.path)  # what export copies from it (tokenizer files) must name no foreign code
    modules = sorted(
        (n.removesuffix(SHARED + "weight") for n in checkpoint.tensors if n.endswith(SHARED + "weight")),
        key=natural_key,
    )
    if not modules:
        raise InputError(f"{model_dir}: no upscaled linears (*.shared_linear.weight) found")
    try:
        smile = SmileFolder(checkpoint, config, modules, int(config["num_local_experts"]))
        for module in modules:
            smile.ranks(module)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{model_dir}: config.json has malformed SMILE fields ({e!r})") from e
    return smile


def export(
    model_dir: Path, expert: int, kind: str, out: Path, *, force: bool = False, max_shard_size=defaults.MAX_SHARD_SIZE
):
    """Write expert `expert` of the SMILE folder model_dir into out, as 'lora' or 'dense'; returns a summary."""
    smile = open_smile(Path(model_dir))
    if not 0 <= expert < smile.num_experts:
        raise InputError(f"--expert {expert} is out of range: 0 to {smile.num_experts - 1}")
    if kind not in ("lora", "dense"):
        raise InputError(f"--as {kind!r}: choose lora or dense")
    out = Path(out).expanduser().absolute()
    check_output_location(out, [(str(smile.checkpoint.path), smile.checkpoint.path)], force)
    staging = staging_path(out, "export")
    check_own_staging(staging)
    fresh_staging(staging)
    try:
        manifest = {"tool": "smile", "version": smile_cli.__version__, "export": {"expert": expert, "kind": kind}}
        write_json(staging / MANIFEST_NAME, manifest)
        if kind == "lora":
            summary = _write_lora(smile, expert, staging)
        else:
            summary = _write_dense(smile, expert, staging, max_shard_size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    move_into_place(staging, out)  # outside: a failure there keeps the old output, and the new one in staging
    summary.update(out=str(out), expert=expert, kind=kind, source=str(smile.checkpoint.path))
    return summary


def _write_tensors(folder: Path, entries, produce, max_shard_size: int) -> list[str]:
    """Plan (name, shape, dtype) entries into shards and write produce(name) for each, one at a time."""
    tensors: list[OutputTensor] = assign_shards(entries, max_shard_size)
    num_shards = tensors[-1].shard + 1
    writer = ShardedWriter(folder, tensors, num_shards)
    try:
        for t in tensors:
            writer.write(t.name, produce(t.name).to(t.dtype).contiguous())
        names = [s.name for s in writer.finish()]
        if num_shards > 1:
            write_index(folder, tensors, names)
        return names
    except BaseException:
        writer.abort()
        raise


# ----------------------------------------------------------------------------------------------- lora


def _write_lora(smile: SmileFolder, expert: int, folder: Path) -> dict:
    if smile.dense:
        raise InputError("the experts of this SMILE folder are dense (rank_of_expert 0): export them --as dense")
    with_bias = [m for m in smile.modules if smile.has(m + ".experts_bias")]
    biased = [m for m in with_bias if smile.read(m + ".experts_bias")[expert].any()]
    if biased:
        raise InputError(
            f"expert {expert} changes the bias of {len(biased)} layer(s) (e.g. '{biased[0]}'), which a LoRA adapter "
            "cannot express: export it --as dense"
        )
    entries, sources, ranks = [], {}, {}
    for m in smile.modules:
        svh = smile.checkpoint.tensors[m + ".experts_svh"]
        u = smile.checkpoint.tensors[m + ".experts_u"]
        rows = smile.ranks(m).expert_rows(expert)
        k = ranks[m] = rows.stop - rows.start
        a, b = f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight"
        entries += [(a, (k, svh.shape[1]), svh.dtype), (b, (u.shape[0], k), u.dtype)]
        sources[a] = lambda m=m, rows=rows: smile.read(m + ".experts_svh")[rows]
        sources[b] = lambda m=m, rows=rows: smile.read(m + ".experts_u")[:, rows]
    files = _write_tensors(folder, entries, lambda name: sources[name](), 2**62)
    (folder / files[0]).rename(folder / ADAPTER_WEIGHTS)
    k = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    config = adapter_config(smile, k, {m: r for m, r in ranks.items() if r != k})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(_card(smile, expert, "a PEFT LoRA adapter of the base (scale 1)"))
    params = sum(e[1][0] * e[1][1] for e in entries)
    return {"files": [ADAPTER_WEIGHTS, "adapter_config.json"], "rank": k, "params": params}


def _base_name(smile: SmileFolder) -> str | None:
    manifest = smile.checkpoint.path / MANIFEST_NAME
    try:
        return json.loads(manifest.read_text())["options"]["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def target_modules(smile: SmileFolder) -> list[str]:
    """The upscaled modules as PEFT target_modules: their last name components (q_proj, ...) when those pick out
    exactly the upscaled modules, else the full module names."""
    short = sorted({m.rsplit(".", 1)[-1] for m in smile.modules})
    upscaled = set(smile.modules)
    others = {n.removesuffix(".weight") for n in smile.checkpoint.tensors if n.endswith(".weight") and SHARED not in n}
    if any(o.rsplit(".", 1)[-1] in short for o in others - upscaled):
        return list(smile.modules)
    return short


def adapter_config(smile: SmileFolder, rank: int, rank_pattern: dict[str, int]) -> dict:
    """adapter_config.json with the fields PEFT writes for a plain LoRA (PEFT fills in any it adds later);
    rank_pattern: full module name -> rank, where it is not `rank` (alpha follows: the scale stays 1)."""
    architectures = base_architectures(smile.config)
    return {
        "alpha_pattern": dict(rank_pattern),
        "base_model_name_or_path": _base_name(smile),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": rank,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": dict(rank_pattern),
        "revision": None,
        "target_modules": target_modules(smile),
        "task_type": "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in architectures) else None,
        "use_dora": False,
        "use_rslora": False,
    }


# ----------------------------------------------------------------------------------------------- dense


def base_architectures(config: dict) -> list[str]:
    """The base's architectures: upscale writes Smile + each of them."""
    return [a.removeprefix("Smile") for a in config.get("architectures") or []]


def base_config(config: dict) -> dict:
    """The base's config.json back from a SMILE config: the base model_type and architectures, no SMILE fields."""
    plain = {k: v for k, v in config.items() if k not in SMILE_CONFIG_FIELDS and not k.startswith("smile_")}
    plain["model_type"] = str(config["model_type"]).removeprefix("smile_")
    plain["architectures"] = base_architectures(config)
    return plain


def _write_dense(smile: SmileFolder, expert: int, folder: Path, max_shard_size: int) -> dict:
    entries, sources = [], {}
    upscaled = set(smile.modules)
    expert_tensors = {f"{m}.{t}" for m in smile.modules for t in EXPERT_TENSORS}
    for name in sorted(smile.checkpoint.tensors, key=natural_key):
        info = smile.checkpoint.tensors[name]
        module, _, rest = name.rpartition(SHARED) if SHARED in name else ("", "", "")
        if module in upscaled:
            target = f"{module}.{rest}"
            entries.append((target, info.shape, info.dtype))
            sources[target] = lambda m=module, r=rest: _dense_tensor(smile, m, r, expert)
        elif name not in expert_tensors:
            entries.append((name, info.shape, info.dtype))
            sources[name] = lambda n=name: smile.read(n)
    files = _write_tensors(folder, entries, lambda name: sources[name](), max_shard_size)
    (folder / "config.json").write_text(json.dumps(base_config(smile.config), indent=2, sort_keys=True) + "\n")
    for path in sorted({p for pattern in BASE_FILE_PATTERNS for p in smile.checkpoint.path.glob(pattern)}):
        if path.is_file():
            shutil.copyfile(path, folder / path.name)
    (folder / "README.md").write_text(_card(smile, expert, "a dense model of the base architecture"))
    return {"files": files, "params": sum(math.prod(shape) for _, shape, _ in entries)}


def _dense_tensor(smile: SmileFolder, module: str, rest: str, expert: int) -> torch.Tensor:
    """The base weight (or bias) of module plus expert's change, computed in float32."""
    shared = smile.read(f"{module}{SHARED}{rest}")
    if rest == "weight":
        return shared.float() + smile.expert_update(module, expert)
    if rest == "bias" and smile.has(module + ".experts_bias"):
        return shared.float() + smile.read(module + ".experts_bias")[expert].float()
    raise SmileError(f"unexpected tensor {module}{SHARED}{rest}")


def _card(smile: SmileFolder, expert: int, what: str) -> str:
    base = _base_name(smile) or "the base model"
    return (
        f"# Expert {expert} of a SMILE model\n\nExported by `smile export` from `{smile.checkpoint.path.name}` as "
        f"{what}: the base `{base}` plus expert {expert}'s update ({'dense' if smile.dense else 'low-rank'}), "
        "as the SMILE model computes it when every token is routed to that expert.\n"
    )
