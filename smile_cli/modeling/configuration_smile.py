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
#     smile_engine_routing  the per-token mode a serving engine that packs requests (vLLM) runs instead of a prompt
#                           mode (`--routing auto` writes "faithful" beside the prompt mode it chose); absent or
#                           null: such an engine refuses a prompt mode
#     smile_calibrated_routers   true when every SmileLinear holds routers fitted to example prompts
#                           (`smile upscale --calibrate`; routing "calibrated"); absent: none
#
# Any transformers architecture works: the SMILE config class of a base config class `XConfig` is named
# `SmileXConfig` and is built on first use (config.json's auto_map names it, e.g.
# "configuration_smile.SmileT5Config"). Its model_type is "smile_" + the base's model_type.
import dataclasses

import transformers
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

_CONFIG_CLASSES = {}
_FIELDS = {  # name: (type, default)
    "num_local_experts": (int, 1),
    "num_experts_per_tok": (int, 1),
    "rank_of_router": (int, 8),
    "rank_of_expert": (int, 128),
    "smile_target_modules": (list | None, None),
    "smile_ranks": (dict | None, None),
    "smile_routing": (str, "faithful"),
    "smile_routing_temperature": (float, 1.0),
    "smile_engine_routing": (str | None, None),
    "smile_calibrated_routers": (bool, False),
}


def smile_config_class(base_config_class):
    """base_config_class (a transformers config class) extended with the SMILE fields; one class per base."""
    name = "Smile" + base_config_class.__name__
    if name not in _CONFIG_CLASSES:
        namespace = {
            "__module__": __name__,
            "model_type": "smile_" + base_config_class.model_type,
            "base_model_type": base_config_class.model_type,
        }
        if dataclasses.is_dataclass(base_config_class):  # configs are strict dataclasses (later 5.x releases)
            namespace["__annotations__"] = {key: kind for key, (kind, _) in _FIELDS.items()}
            namespace.update({key: default for key, (_, default) in _FIELDS.items()})
            _CONFIG_CLASSES[name] = strict(type(name, (base_config_class,), namespace))
        else:  # configs take keyword arguments in __init__ (5.0 and the first 5.x releases)

            def __init__(self, **kwargs):  # the base takes its own arguments; the SMILE fields get their defaults
                smile = {key: kwargs.pop(key, default) for key, (_, default) in _FIELDS.items()}
                base_config_class.__init__(self, **kwargs)
                for key, value in smile.items():
                    setattr(self, key, value)

            namespace["__init__"] = __init__
            _CONFIG_CLASSES[name] = type(name, (base_config_class,), namespace)
    return _CONFIG_CLASSES[name]


def __getattr__(name):
    """`SmileXConfig` for any config class `XConfig` of the installed transformers (PEP 562)."""
    base = getattr(transformers, name.removeprefix("Smile"), None) if name.startswith("Smile") else None
    if isinstance(base, type) and issubclass(base, PreTrainedConfig):
        return smile_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
