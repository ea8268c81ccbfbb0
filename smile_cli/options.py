"""Options of `smile upscale`: one validated model, filled from a YAML file and command-line flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from smile_cli import defaults
from smile_cli.errors import InputError
from smile_cli.targets import parse_patterns

# --budget: a ratio to the base's parameters (1.2x) or a count (8e9, 7.5B, 300M), lower-cased: ranks.parse_budget
BUDGET = re.compile(r"(\d+(?:\.\d+)?(?:e\d+)?)\s*([xkmbt]?)")

AUTO_ROUTING = "auto"  # --routing auto: the architecture's routing (planning.resolve_routing)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(value) -> int:
    """Bytes from an int or a string like 500MB, 5GB, 2GiB (decimal units as on the Hub, binary with 'i')."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match and match.group(2).upper()
        if not match or unit not in SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use bytes, or e.g. 500MB, 5GB, 2GiB)")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class UpscaleOptions(BaseModel):
    """Everything that determines the output of `smile upscale` (written into the output as smile_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    base: str
    experts: list[str] = Field(min_length=1)
    # "auto": ranks allocated per module (and expert) from the updates' singular values (ranks.py)
    router_rank: int | Literal["auto"] = defaults.ROUTER_RANK
    expert_rank: int | Literal["full", "auto"] = defaults.EXPERT_RANK
    # total parameters of the output for `expert_rank: auto`: "1.2x" (times the base's) or a count ("7.5B")
    budget: str | None = None
    top_k: int = defaults.TOP_K
    # how tokens pick experts (modeling_smile.ROUTING_MODES); faithful = the paper's per-token, per-layer router;
    # auto: chosen from the base's architecture when the plan is made (planning.resolve_routing), never recorded
    routing: str = defaults.ROUTING
    routing_temperature: float = defaults.ROUTING_TEMPERATURE  # softmax temperature of the variants' scores
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = defaults.DTYPE
    max_shard_size: int = defaults.MAX_SHARD_SIZE
    svd: Literal["exact", "randomized", "auto"] = defaults.SVD
    seed: int = defaults.SEED  # seeds every random choice (the randomized SVD's sketches)
    device: str = defaults.DEVICE
    # module-name patterns of the nn.Linear layers to upscale (targets.py); None: the architecture's default
    target: list[str] | None = None
    # the output's tokenizer (vocab.py): base | union | N (the N-th expert's, 1-based)
    tokenizer: str = "base"
    # the output's chat template (vocab.py): auto | base | N | a file holding the template
    chat_template: str = "auto"
    # accept experts whose tokenizer's vocabulary is not the base's (or an extension of it)
    allow_vocab_mismatch: bool = False
    # how Hub inputs are read (inputs/hub_checkpoint.py): stream, download, or auto (cached files from the cache,
    # the rest streamed).
    # It does not change the output, so it is left out of smile_config.yaml and the manifest (exclude).
    inputs: Literal["stream", "download", "auto"] = Field(default="auto", exclude=True)
    # a YAML file of example prompts per expert (calibrate.py): routers fitted to them, routing "calibrated".
    # Recorded only when given, so that outputs without it keep their bytes (_drop_unset_calibrate).
    calibrate: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_calibrate(self, handler):
        data = handler(self)
        if self.calibrate is None:
            data.pop("calibrate", None)
        return data

    @field_validator("experts", mode="before")
    @classmethod
    def _split_experts(cls, value):
        """'a,b' or ['a,b', 'c'] (a repeated --experts flag) -> ['a', 'b', 'c']."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [p.strip() for v in value for p in (v.split(",") if isinstance(v, str) else [v])]
            value = [v for v in value if not (isinstance(v, str) and not v)]
        return value

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value):
        return parse_patterns(value)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer(cls, value):
        text = str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text not in ("base", "union") and not (text and text.isdigit() and int(text) >= 1):
            raise ValueError(f"tokenizer {value!r}: use base, union, or N (the N-th expert's, counted from 1)")
        return text

    @field_validator("chat_template", mode="before")
    @classmethod
    def _chat_template(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"chat template {value!r}: use auto, base, N (the N-th expert's) or a template file")
        value = value.strip()
        return value.lower() if value.lower() in ("auto", "base") else value

    @field_validator("router_rank", "expert_rank", mode="before")
    @classmethod
    def _rank_word(cls, value):
        """'full', 'auto' (any case) or a number, as given on the command line ('8')."""
        if isinstance(value, str) and value.strip().lower() in ("full", "auto"):
            return value.strip().lower()
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value):
        if value is not None and not BUDGET.fullmatch(value.strip().lower()):
            raise ValueError(f"budget {value!r}: give a ratio like 1.2x or a parameter count like 7.5B")
        return value

    @model_validator(mode="after")
    def _budget_for_auto(self):
        if (self.expert_rank == "auto") != (self.budget is not None):
            raise ValueError("expert rank 'auto' and a budget go together (--expert-rank auto --budget 1.2x)")
        return self

    @field_validator("routing")
    @classmethod
    def _routing(cls, value):
        from smile_cli.modeling.modeling_smile import ROUTING_MODES

        if value != AUTO_ROUTING and value not in ROUTING_MODES:
            raise ValueError(f"unknown routing {value!r} (use one of: {AUTO_ROUTING}, {', '.join(ROUTING_MODES)})")
        return value

    @field_validator("routing_temperature")
    @classmethod
    def _temperature(cls, value):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"routing temperature must be a positive number, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"not a device: {value!r} (use auto, cpu, cuda or cuda:N)")
        return value

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value):
        return parse_size(value)

    @property
    def dense_experts(self) -> bool:
        return self.expert_rank == "full"

    @property
    def expert_rank_value(self) -> int:
        """rank_of_expert as stored in the model config: 0 for dense experts (not for `auto`: see plan.ranks)."""
        if self.expert_rank == "auto":
            raise ValueError("expert rank 'auto' has one value per module: see Plan.ranks")
        return 0 if self.expert_rank == "full" else int(self.expert_rank)


def load_options(config_file: Path | None, overrides: dict) -> UpscaleOptions:
    """Options from an optional YAML file, with every non-None override (command-line flag) on top."""
    values: dict = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text())
        except OSError as e:
            raise InputError(f"{config_file}: cannot read config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise InputError(f"{config_file}: not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"{config_file}: the config must be a YAML mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in (loaded or {}).items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return UpscaleOptions(**values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        source = f"{config_file}: " if config_file else ""
        if first["type"] == "missing":
            raise InputError(f"--{where.replace('_', '-')} is required (or '{where}:' in a --config file)") from e
        raise InputError(f"{source}{where}: {first['msg']}") from e


def dump_options(options: UpscaleOptions) -> str:
    return yaml.safe_dump(options.model_dump(), sort_keys=False)
