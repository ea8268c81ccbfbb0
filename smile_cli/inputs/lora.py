"""PEFT LoRA adapters: read an adapter folder, resolve each module's rank and scale, factorize its update exactly
(the expert built on it, LoraExpert, is in experts.py).

A LoRA adapter changes a linear layer by dW = scale * B @ A, with A (r x in), B (out x r) and
scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r and lora_alpha resolved per module through
rank_pattern / alpha_pattern as PEFT does. Its singular triplets come from the factors alone:
B = Q_B R_B and A^T = Q_A R_A (thin QR), then the small SVD R_B (scale) R_A^T = U S V^T gives
dW = (Q_B U) S (Q_A V)^T. The dense out x in matrix is never formed, and the factorization is exact.

Modules the adapter does not touch have a zero update (zero factors); LoRA leaves biases as they are, except
with lora_bias=True, where the bias moves by scale * lora_B.bias.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smile_cli.errors import InputError
from smile_cli.factorize import Factors, single_threaded, zero_factors
from smile_cli.files import check_folder_files
from smile_cli.inputs.checkpoint import file_fingerprints
from smile_cli.inputs.checks import read_json_object
from smile_cli.inputs.safetensors_format import TensorInfo, read_safetensors_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one module: tensor names in the adapter file, rank and scale."""

    module: str
    a: str
    b: str
    rank: int
    scale: float
    bias: str | None = None


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder: its config, where its lora_A / lora_B factors lie, and each module's factors."""

    ref: str
    path: Path
    adapter_config: dict
    tensors: dict[str, TensorInfo]
    revision: str | None
    files: list[Path]
    warnings: list[str]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def base_model_name(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path")

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.ref, self.tensors, name)

    def fingerprint(self) -> dict:
        """As Checkpoint.fingerprint, with adapter_config.json in place of config.json."""
        files = file_fingerprints(self.files, self.revision)
        config = hashlib.sha256((self.path / ADAPTER_CONFIG).read_bytes()).hexdigest()
        return {"ref": self.ref, "revision": self.revision, "adapter_config_sha256": config, "files": files}


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def open_adapter(ref: str, folder: Path, revision: str | None) -> LoraAdapter:
    """Read and check adapter_config.json and the adapter's safetensors header (no tensor is read)."""
    check_folder_files(folder, ref)
    config = _read_config(ref, folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(f"{ref}: only adapter_model.bin (a pickle); smile reads adapter_model.safetensors only")
        raise InputError(f"{ref}: no {ADAPTER_WEIGHTS} in {folder}")
    tensors, _ = read_safetensors_header(weights)
    modules = _modules(ref, config, tensors)
    warnings = []
    if config.get("modules_to_save"):
        warnings.append(
            f"{ref}: modules_to_save {config['modules_to_save']} are fully trained copies; they are not folded in "
            "(those modules come from the base)"
        )
    return LoraAdapter(ref, folder, config, tensors, revision, [weights], warnings, modules)


def _read_config(ref: str, path: Path) -> dict:
    config = read_json_object(ref, path)
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InputError(f"{ref}: a {peft_type} adapter; only LoRA adapters can be experts")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if config.get(unsupported):
            raise InputError(f"{ref}: {unsupported}=true adapters are not supported (the update is not B @ A)")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InputError(f"{ref}: {ADAPTER_CONFIG} has no valid r")
    if not isinstance(config.get("lora_alpha"), int | float):
        raise InputError(f"{ref}: {ADAPTER_CONFIG} has no valid lora_alpha")
    return config


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key K (a regex) with module matching (.*\\.)?K$."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str) -> tuple[int, float]:
    """(r, scale) of one module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _modules(ref: str, config: dict, tensors: dict) -> dict[str, LoraModule]:
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _KEY.match(key)
        if match is None:
            raise InputError(f"{ref}: tensor '{key}' is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
        which = match["which"] if match["param"] == "weight" else "bias" + match["which"]
        found.setdefault(match["module"], {})[which] = key
    modules = {}
    for module, keys in found.items():
        if "A" not in keys or "B" not in keys or "biasA" in keys:
            raise InputError(f"{ref}: module '{module}' lacks lora_A or lora_B (or has an unexpected lora_A.bias)")
        r, scale = module_scale(config, module)
        if tensors[keys["A"]].shape[0] != r:
            raise InputError(
                f"{ref}: '{module}' lora_A has {tensors[keys['A']].shape[0]} rows, the adapter config's rank is {r}"
            )
        modules[module] = LoraModule(module, keys["A"], keys["B"], r, scale, keys.get("biasB"))
    return modules


def lora_factors(b: torch.Tensor, a: torch.Tensor, scale: float, rank: int) -> Factors:
    """Top `rank` singular triplets of scale * b @ a (b: out x r, a: r x in), exactly, in float64, returned in
    float32; beyond the update's rank (at most r), the triplets are zeros."""
    b, a = b.double(), a.double()
    with single_threaded():  # the same bytes on any thread count (factorize.py)
        q_b, r_b = torch.linalg.qr(b, mode="reduced")  # (out, p), (p, r)
        q_a, r_a = torch.linalg.qr(a.T, mode="reduced")  # (in, q), (q, r)
        u_small, s, vh_small = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    u, vh = q_b @ u_small, vh_small @ q_a.T
    kept = min(rank, s.shape[0])
    factors = zero_factors((b.shape[0], a.shape[1]), rank)
    factors.u[:, :kept] = u[:, :kept]
    factors.s[:kept] = s[:kept]
    factors.vh[:kept] = vh[:kept]
    return factors
