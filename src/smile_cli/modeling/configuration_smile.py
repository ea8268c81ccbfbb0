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
#     smile_target_modules  name suffixes of the nn.Linear layers that were upscaled
#     smile_routing         how tokens pick experts: "faithful" (the paper's per-token, per-layer router) or a
#                           data-free variant of modeling_smile.ROUTING_MODES (absent in older outputs: faithful)
#     smile_routing_temperature  softmax temperature of the variants' normalised scores (not used by faithful)
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

DECODER_PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _smile_config_class(base_config_class):
    """The base config class extended with the SMILE fields, model_type `smile_<base type>`."""
    namespace = {
        "model_type": "smile_" + base_config_class.model_type,
        "base_model_type": base_config_class.model_type,
        "__annotations__": {
            "num_local_experts": int,
            "num_experts_per_tok": int,
            "rank_of_router": int,
            "rank_of_expert": int,
            "smile_target_modules": list | None,
            "smile_routing": str,
            "smile_routing_temperature": float,
        },
        "num_local_experts": 1,
        "num_experts_per_tok": 1,
        "rank_of_router": 8,
        "rank_of_expert": 128,
        "smile_target_modules": None,
        "smile_routing": "faithful",
        "smile_routing_temperature": 1.0,
    }
    return strict(type("Smile" + base_config_class.__name__, (base_config_class,), namespace))


SmileMistralConfig = _smile_config_class(MistralConfig)
SmileLlamaConfig = _smile_config_class(LlamaConfig)
SmileQwen2Config = _smile_config_class(Qwen2Config)
SmileQwen3Config = _smile_config_class(Qwen3Config)

# base model_type -> SMILE config class; the only architectures this file knows.
SMILE_CONFIG_CLASSES = {
    cls.base_model_type: cls for cls in (SmileMistralConfig, SmileLlamaConfig, SmileQwen2Config, SmileQwen3Config)
}
