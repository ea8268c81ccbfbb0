"""What the installed transformers knows about the base's architecture: its model class, the Auto classes
that load it, and its modules (which are nn.Linear, with what shapes), read from a weightless model.

The model is built on the meta device from the base's config.json alone (no tensor is allocated), so the
plan can name the nn.Linear layers to upscale before any weight is read, for any architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smile_cli.errors import InputError

# Auto classes an output's auto_map may offer, with the transformers mapping (model_type -> class name) of each.
AUTO_CLASS_MAPPINGS = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


@dataclass(frozen=True)
class LinearModule:
    out_features: int
    in_features: int
    has_bias: bool


@dataclass(frozen=True)
class Architecture:
    """The base's architecture as the installed transformers builds it."""

    model_type: str  # e.g. t5
    class_name: str  # the base's model class, e.g. T5ForConditionalGeneration
    config_class_name: str  # e.g. T5Config
    auto_classes: dict[str, str]  # Auto class -> transformers class it loads, e.g. AutoModel -> T5Model
    linears: dict[str, LinearModule]  # every nn.Linear module, by name, in module order
    other_weighted: dict[str, str]  # modules with a 2-D weight that are not nn.Linear -> their type (Conv1D, ...)
    parameters: dict[str, tuple[int, ...]]  # parameter name -> shape, one name per tensor (tied copies left out)
    tied: dict[str, str]  # parameter name -> the parameter it shares its tensor with
    output_head: str | None  # the output-embeddings module (lm_head), never upscaled by default
    input_embeddings: str | None = None  # the input-embeddings module (model.embed_tokens)
    is_encoder_decoder: bool = False  # the config's (T5: True)

    @property
    def prompt_routing(self) -> tuple[bool, str]:
        """(whether the prompt routing modes can route this architecture, why): a decoder-only causal LM."""
        from smile_cli.modeling.modeling_smile import prompt_routing_support

        return prompt_routing_support(self.model_type, self.class_name, self.is_encoder_decoder)

    @property
    def main_auto_class(self) -> str:
        """The Auto class that loads the base's own class (AutoModelForCausalLM for a causal LM)."""
        for auto, name in self.auto_classes.items():
            if name == self.class_name:
                return auto
        return "AutoModel"


def read_architecture(ref: str, config: dict, tensor_names=()) -> Architecture:
    """The architecture of a checkpoint whose config.json is `config`; InputError when transformers lacks it.

    The model class is config.json's `architectures[0]`; a config without it gets the class, among those the
    Auto classes map its model_type to, whose parameter names match the most of `tensor_names`."""
    import transformers
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    version = transformers.__version__
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(
            f"{ref}: model_type {model_type!r} is unknown to the installed transformers {version}; "
            "smile upscales architectures that transformers implements (custom code is never run)"
        )
    if get_checkpoint_conversion_mapping(model_type):
        raise InputError(
            f"{ref}: transformers {version} renames or repacks the weights of '{model_type}' checkpoints when "
            "loading them; SMILE outputs of this architecture are not supported"
        )
    mappings = {auto: getattr(modeling_auto, names) for auto, names in AUTO_CLASS_MAPPINGS.items()}
    architectures = config.get("architectures")
    if architectures:
        class_name = architectures[0]
    else:
        candidates = list(dict.fromkeys(m[model_type] for m in mappings.values() if isinstance(m.get(model_type), str)))
        class_name = max(candidates, key=lambda name: _overlap(ref, name, config, tensor_names), default=None)
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if not isinstance(model_class, type) or not issubclass(model_class, transformers.PreTrainedModel):
        raise InputError(
            f"{ref}: architecture {class_name!r} (config.json 'architectures') is not a model class of the "
            f"installed transformers {version}"
        )
    auto_classes = {auto: m[model_type] for auto, m in mappings.items() if m.get(model_type) == class_name}
    if isinstance(mappings["AutoModel"].get(model_type), str):
        auto_classes = {"AutoModel": mappings["AutoModel"][model_type], **auto_classes}
    return _inspect(ref, model_type, model_class, config, auto_classes)


def _overlap(ref: str, class_name: str, config: dict, tensor_names) -> int:
    """How many of tensor_names are parameters of transformers' class_name built from config (-1 if it fails)."""
    import transformers

    try:
        architecture = _inspect(ref, config["model_type"], getattr(transformers, class_name), config, {})
    except (InputError, AttributeError):
        return -1
    return len(set(architecture.parameters) & set(tensor_names))


def _inspect(ref: str, model_type: str, model_class, config: dict, auto_classes: dict) -> Architecture:
    import torch
    from torch import nn

    fields = {k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path", "torch_dtype", "dtype")}
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)  # construction warnings are about the config, not for us
    try:
        model_config = model_class.config_class.from_dict(fields)
        with torch.device("meta"):
            model = model_class(model_config)
            model.tie_weights()  # transformers 5.0 ties in __init__ only off the meta device; later 5.x on it too
    except Exception as e:  # noqa: BLE001 - whatever transformers objects to, name it
        raise InputError(
            f"{ref}: transformers cannot build {model_class.__name__} from config.json: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        transformers_logger.setLevel(level)
    linears, other = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = LinearModule(module.out_features, module.in_features, module.bias is not None)
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
            other[name] = type(module).__name__
    parameters = {name: tuple(p.shape) for name, p in model.named_parameters()}
    first_name = {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    tied = {
        name: first_name[id(p)]
        for name, p in model.named_parameters(remove_duplicate=False)
        if first_name[id(p)] != name
    }
    head_name, embeddings_name = (_module_name(model, getter) for getter in ("output", "input"))
    return Architecture(
        model_type=model_type,
        class_name=model_class.__name__,
        config_class_name=model_class.config_class.__name__,
        auto_classes=auto_classes,
        linears=linears,
        other_weighted=other,
        parameters=parameters,
        tied=tied,
        output_head=head_name,
        input_embeddings=embeddings_name,
        is_encoder_decoder=bool(getattr(model_config, "is_encoder_decoder", False)),
    )


def _module_name(model, which: str) -> str | None:
    """The name of the model's output or input embeddings module (get_output_embeddings / ...), if any."""
    try:
        found = getattr(model, f"get_{which}_embeddings")()
    except (AttributeError, NotImplementedError):
        found = None
    return next((name for name, module in model.named_modules() if found is not None and module is found), None)
