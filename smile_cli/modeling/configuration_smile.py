# Configuration of a SMILE (Sparse Mixture of Low-rank Experts) model.
#
# This file is copied unchanged into every model folder written by `smile upscale`. It imports only
# transformers and huggingface_hub, never the smile_cli package, so the folder loads on its own:
#     AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
#
# A SMILE config is the base model's config plus these fields:
#     num_local_experts     T, the number of fine-tuned models folded in
#     num_experts_per_tok   top-k experts added per token and per upscaled linear layer
#     rank_of_router        right singular vectors per expert used for routing (gate_k)
#     rank_of_expert        rank k of each expert's low-rank update; 0 means dense task-update experts
#     smile_ranks           per-module ranks where they differ (budgeted ranks, `--expert-rank auto`):
#                           {module name: {"router": g, "experts": [k_1, ..., k_T]}}; modules it does not name
#                           use rank_of_router and rank_of_expert (absent or null: every module uses those)
#     smile_target_modules  full names of the nn.Linear modules that were upscaled (as in the checkpoint)
#     smile_routing         how tokens pick experts: "faithful" (the paper's per-token, per-layer router) or a
#                           data-free variant of modeling_smile.ROUTING_MODES (absent in older outputs: faithful)
#     smile_routing_temperature  softmax temperature of the variants' normalised scores (not used by faithful)
#
# Any transformers architecture works: the SMILE config class of a base config class `XConfig` is named
# `SmileXConfig` and is built on first use (config.json's auto_map names it, e.g.
# "configuration_smile.SmileT5Config"). Its model_type is "smile_" + the base's model_type.
import transformers
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

_CONFIG_CLASSES = {}


def smile_config_class(base_config_class):
    """base_config_class (a transformers config class) extended with the SMILE fields; one class per base."""
    name = "Smile" + base_config_class.__name__
    if name not in _CONFIG_CLASSES:
        namespace = {
            "__module__": __name__,
            "model_type": "smile_" + base_config_class.model_type,
            "base_model_type": base_config_class.model_type,
            "__annotations__": {
                "num_local_experts": int,
                "num_experts_per_tok": int,
                "rank_of_router": int,
                "rank_of_expert": int,
                "smile_target_modules": list | None,
                "smile_ranks": dict | None,
                "smile_routing": str,
                "smile_routing_temperature": float,
            },
            "num_local_experts": 1,
            "num_experts_per_tok": 1,
            "rank_of_router": 8,
            "rank_of_expert": 128,
            "smile_target_modules": None,
            "smile_ranks": None,
            "smile_routing": "faithful",
            "smile_routing_temperature": 1.0,
        }
        _CONFIG_CLASSES[name] = strict(type(name, (base_config_class,), namespace))
    return _CONFIG_CLASSES[name]


def __getattr__(name):
    """`SmileXConfig` for any config class `XConfig` of the installed transformers (PEP 562)."""
    base = getattr(transformers, name.removeprefix("Smile"), None) if name.startswith("Smile") else None
    if isinstance(base, type) and issubclass(base, PreTrainedConfig):
        return smile_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
